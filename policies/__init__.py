"""The contract every party agrees on: study spec, cohort schema, features, metrics.

No network and no Flower here: silos and the coordinator both import this package,
and it imports neither of them.
"""

PROTOCOL_VERSION = 1
