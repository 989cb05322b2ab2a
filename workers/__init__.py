"""Entry points of the distributed roles: `python -m workers.<role>` for coordinator, server, clustering,
aggregator and client. Each parses its flags (workers/common.py) and runs the role with
`hfgan_core.runtime.services.serve`; the logic lives in hfgan_core.

Settings (flags win over the environment, which wins over the config file's `[runtime]`):

| flag           | environment          | what                                                             |
|----------------|----------------------|------------------------------------------------------------------|
| `--config`     | `HFGAN_CONFIG`       | a preset name or a TOML file (required)                          |
| `--run-id`     | `HFGAN_RUN_ID`       | the run (required, or the name of `--run-dir`)                   |
| `--broker`     | `HFGAN_BROKER_URL`   | `amqp://user:pass@host:5672/%2F` (`{slot}` is a client's slot)   |
| `--state`      | `HFGAN_STATE_URL`    | `redis://host:6379/0`                                            |
| `--data-dir`   | `HFGAN_DATA_DIR`     | dataset root (clients: their shard; coordinator: test sets)      |
| `--run-dir`    | `HFGAN_RUN_DIR`      | run outputs and checkpoints                                      |
| `--device`     | `HFGAN_DEVICE`       | torch device                                                     |

More in the environment (hfgan_core/runtime/worker.py): `HFGAN_BROKER_NAMESPACE` (AMQP namespace, `hfgan`),
`HFGAN_HEARTBEAT_S` (2), `HFGAN_HEARTBEAT_TTL_S` (10), `HFGAN_LEASE_TTL_S` (15), `HFGAN_CONNECT_TIMEOUT_S` (60).
For fault-injection tests only: `HFGAN_TEST_AGGREGATOR_HOLD=<round>:<seconds>` makes an aggregator pause with a job
of that round in hand (after recording its digest, before answering); unset in every real deployment.

Role flags: client `--client K` (a fixed client instead of a claimed slot); aggregator `--index I`; coordinator
`--standby-ok` (wait as standby while another coordinator leads; without it a coordinator waits one lease TTL for
a crashed predecessor's lease, then gives up) and `--no-utility` (`HFGAN_NO_UTILITY=1`); every role
`--no-fallback` (`HFGAN_NO_FALLBACK=1`: no synthetic stand-in for a missing dataset).

Exit codes:

| code | meaning                                                                                          |
|------|--------------------------------------------------------------------------------------------------|
| 0    | finished: the run ended, or stopped by SIGTERM / SIGINT (after the message in hand)               |
| 1    | internal error (a bug; a coordinator that lost its lease; a client that lost its slot)            |
| 2    | bad configuration (config, run id, URLs, refused credentials, a run directory of another run,     |
|      | a second coordinator without `--standby-ok`)                                                     |
| 3    | the broker or the state store stayed unreachable for `HFGAN_CONNECT_TIMEOUT_S` (60 s)             |
"""
