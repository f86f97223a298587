"""Links between parties: the Channel interface (in-memory and gRPC + mutual TLS), the typed
protobuf wire format, certificates, and the names (roles, session ids) every link agrees on."""
