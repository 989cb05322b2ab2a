"""`python -m hfgan_core.transport.amqp ...`."""

from .cli import main

raise SystemExit(main())
