"""Generated protobuf and gRPC code for esper.v1. Regenerate with `make proto`; do not edit."""
