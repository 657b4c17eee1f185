"""The cer wire protocol: method definitions, the ZeroMQ frontend, the client, and the Gateway through which
the frontends' requests reach the actors."""
