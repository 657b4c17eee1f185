"""The cer wire protocol: method definitions, the ZeroMQ frontend and the client."""
