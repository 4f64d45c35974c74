"""gRPC server of Urza (`esper.v1.UrzaService`); logic lives in `esper.urza`."""
