"""``hydra/sweeper=meta_llr`` (meta_llr's default): Hydra's basic sweeper whose sweeps survive
their jobs. Hydra loads sweepers only from the ``hydra_plugins`` package; the behaviour lives
in :mod:`meta_llr.sweep`."""
from dataclasses import dataclass
from typing import Dict, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore


@dataclass
class MetaLLRSweeperConf:
    _target_: str = "hydra_plugins.meta_llr_sweeper.MetaLLRSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="meta_llr", node=MetaLLRSweeperConf, provider="meta_llr")


class MetaLLRSweeper(BasicSweeper):
    def sweep(self, arguments):
        from meta_llr.sweep import sweep

        return sweep(self, arguments)
