"""Oona gRPC server: `OonaServicer` translates esper.v1 messages to `esper.oona.OonaBus` calls."""
