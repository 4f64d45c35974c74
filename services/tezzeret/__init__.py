"""gRPC server of Tezzeret (`esper.v1.TezzeretService`); logic lives in `esper.tezzeret`."""
