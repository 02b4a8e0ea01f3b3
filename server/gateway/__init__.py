"""The gateway: the asyncio gRPC server in front of Triton (app, servicer, service, batching,
health, catalog, interceptor, auth, TLS, metrics) and its backends. Stands on the protocol and
the contract; never imports the client, the Triton side or torch."""
