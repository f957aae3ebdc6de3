"""Being a service of a run: the bus (NATS JetStream), the run record and checkpoint manifests
(Redis), subjects, the service context, embedded servers, the local Ray head and fault points."""
