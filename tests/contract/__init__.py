"""Contract suites shared by every implementation of an interface: the memory backends run them in tests/unit, the
real ones (RabbitMQ, Redis) in tests/integration. A subclass provides the factory; the suite says what must hold."""
