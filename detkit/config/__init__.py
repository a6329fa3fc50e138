"""Typed configs: dataclass schemas and their YAML loading, validation and overrides."""
from .load import ConfigError, dump_yaml, from_dict, load_config, merge, parse_overrides, read_yaml, to_dict
from .schema import (Config, DataConfig, DatasetConfig, EvalConfig, InputConfig, ModelConfig, RuntimeConfig,
                     SolverConfig, TransformConfig)

__all__ = [
    "Config", "ConfigError", "DataConfig", "DatasetConfig", "EvalConfig", "InputConfig", "ModelConfig",
    "RuntimeConfig", "SolverConfig", "TransformConfig", "dump_yaml", "from_dict", "load_config", "merge",
    "parse_overrides", "read_yaml", "to_dict",
]
