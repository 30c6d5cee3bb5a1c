"""Typed configuration.

``load_config`` turns YAML into the dataclasses of spamtrap.config.schema;
it is strict: unknown keys and bad values are errors that carry the line
number in the file. Config is always passed in, never global, so two
services can run in one test process.

The package, in the order a document goes through it:

- ``schema``: the dataclasses. Each key is declared once there, with its
  type, default, comment and rule; the ``filters`` and ``outputs`` sections
  in ``filter_schema`` and ``output_schema``.
- ``rules``: the rules a field can declare, and sizes and durations.
- ``nodes``: the YAML as nodes with line numbers, command-line overrides
  merged into it, and ConfigError.
- ``walker`` and ``checks``: the walk against the declarations, and the
  cross-checks no single key's rule can make.
- ``load``: ``load_config`` and ``parse_config``, and ``parse_list_rules``
  for discard-list files.

Everything public is re-exported here: import from ``spamtrap.config``.
"""

from spamtrap.config.checks import (
    forged_header_problem,
)
from spamtrap.config.filter_schema import (
    BUILTIN_STAGES,
    DANGEROUS_EXTENSIONS,
    BounceConfig,
    ClamdConfig,
    CustomStageConfig,
    FilterConfig,
    ListRule,
    ListsConfig,
    SpamdConfig,
    VirusConfig,
)
from spamtrap.config.load import (
    DEFAULT_DOCUMENT,
    load_config,
    parse_config,
    parse_list_rules,
)
from spamtrap.config.nodes import (
    ConfigError,
    ConfigIssue,
    Override,
    merge_overrides,
    option_of,
)
from spamtrap.config.rules import (
    GIB,
    KIB,
    MIB,
    ROLES,
    Parser,
    parse_duration,
    parse_redis_url,
    parse_size,
)
from spamtrap.config.schema import (
    Condition,
    Config,
    FeedConfig,
    HTTPConfig,
    ProxyConfig,
    QueueConfig,
    RelayConfig,
    RetentionConfig,
    RotateConfig,
    SetConfig,
    SetNotifyConfig,
    SMTPConfig,
    SpoolConfig,
    StoreConfig,
    TimeoutConfig,
    TLSConfig,
    TrapConfig,
    WebhookConfig,
    default_config,
)

__all__ = [
    "BUILTIN_STAGES",
    "BounceConfig",
    "ClamdConfig",
    "Condition",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "CustomStageConfig",
    "DANGEROUS_EXTENSIONS",
    "DEFAULT_DOCUMENT",
    "FeedConfig",
    "FilterConfig",
    "GIB",
    "HTTPConfig",
    "KIB",
    "ListRule",
    "ListsConfig",
    "MIB",
    "Override",
    "Parser",
    "ProxyConfig",
    "QueueConfig",
    "ROLES",
    "RelayConfig",
    "RetentionConfig",
    "RotateConfig",
    "SMTPConfig",
    "SetConfig",
    "SetNotifyConfig",
    "SpamdConfig",
    "SpoolConfig",
    "StoreConfig",
    "TLSConfig",
    "TimeoutConfig",
    "TrapConfig",
    "VirusConfig",
    "WebhookConfig",
    "default_config",
    "forged_header_problem",
    "load_config",
    "merge_overrides",
    "option_of",
    "parse_config",
    "parse_list_rules",
    "parse_duration",
    "parse_redis_url",
    "parse_size",
]
