"""A weighted mixture (data.sources) as training sees it: the configured weights matched to the dataset's sources
by name (weights live in the config, not the dataset, so changing them never re-tokenizes), the data order they
make, and what a run plans to draw of each source (sequences, epochs: its up- or down-sampling), refused before any
worker starts where that passes a source's max_epochs. train/data.py draws the order itself."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.config import Config, ConfigError
from tokenization import shards
from train.data import ORDER, PERIOD, MixedOrder, mixture_order, shares


class Mixture:
    """data.sources matched to a dataset's sources once, by name: their weights, the data order they make and
    that order over the manifest's token counts. A dataset of one input has no weights and the global order."""

    def __init__(self, cfg: Config, manifest: dict, where: str):
        """where: the dataset, for messages."""
        self.cfg, self.names = cfg, shards.source_names(manifest)
        self.weights = _weights(cfg, self.names, where)
        self.data_order = ORDER if self.weights is None else mixture_order(self.names, self.weights)
        self.tokens = [[info.tokens for info in shards.shards(manifest, "train", source=n)] for n in self.names]
        self.order = None
        if self.weights is not None:
            try:
                self.order = MixedOrder(self.names, self.tokens, self.weights, cfg.batch.seq_len, cfg.run.seed)
            except ValueError as err:
                raise shards.ShardError(f"{where}: {err} (batch.seq_len={cfg.batch.seq_len})") from None

    def plan(self) -> list[SourcePlan]:
        """What the whole run (train.max_steps) draws of each source; [] for one input. Refuses a plan that
        passes a source's max_epochs, naming the source, its planned epochs and what to change."""
        if self.order is None:
            return []
        cfg, order = self.cfg, self.order
        total = cfg.train.max_steps * (cfg.batch.tokens_per_step // cfg.batch.seq_len)
        drawn = order.mixture.drawn(total)
        tokens = [sum(t) for t in self.tokens]
        rows = [SourcePlan(name, share, t, int(n), source.epochs(int(n)), share / (t / sum(tokens)))
                for name, share, t, n, source in zip(self.names, order.shares, tokens, drawn, order.sources)]
        caps = {s.name: (i, s.max_epochs) for i, s in enumerate(cfg.data.sources)}
        for row in rows:
            i, cap = caps[row.name]
            if cap is not None and row.epochs > cap:
                raise ConfigError(
                    f"data.sources[{i}].max_epochs: source '{row.name}' would be drawn {row.epochs:.3g} epochs over "
                    f"train.max_steps={cfg.train.max_steps} ({row.sequences:,} of {total:,} sequences at "
                    f"{row.share:.4g} of each step), above its max_epochs={cap:g}; lower its weight, shorten the "
                    f"run, or raise max_epochs")
        return rows


def _weights(cfg: Config, names: list[str], where: str) -> list[float] | None:
    """data.sources' weights, one per source of the dataset in its order; None for a dataset of one input."""
    configured = {s.name: s.weight for s in cfg.data.sources}
    if not names and not configured:
        return None
    if sorted(names) != sorted(configured):
        raise ConfigError(
            f"data.sources: {where} holds the sources {', '.join(names) or '(none: one input)'}, the config names "
            f"{', '.join(configured) or '(none: data.input)'}; train with the sources the dataset was tokenized "
            f"from (their weights may change, their names may not)")
    out = [configured[n] for n in names]
    for name, share in zip(names, shares(out)):
        if share * PERIOD < 1:
            raise ConfigError(f"data.sources: source '{name}' has {share:g} of the total weight, below the 1/{PERIOD} "
                              f"a mixture can draw; raise its weight or leave the source out")
    return out


@dataclass
class SourcePlan:
    name: str
    share: float  # of every step's sequences
    tokens: int  # in the source's train split
    sequences: int  # drawn over the whole run
    epochs: float  # passes over the source's train split those make
    sampling: float  # share / the source's share of all train tokens: above 1 up-sampled, below 1 down-sampled

    def params(self) -> dict[str, float | int]:
        return {f"data.sources.{self.name}.{k}": round(v, 6) if isinstance(v, float) else v
                for k, v in self.__dict__.items() if k != "name"}

    def line(self) -> str:
        how = "up-sampled" if self.sampling > 1 else "down-sampled" if self.sampling < 1 else "as its size"
        return (f"source {self.name}: {self.share:.4g} of each step, {self.tokens:,} train tokens, {self.sequences:,} "
                f"sequences over the run = {self.epochs:.3g} epochs ({how} x{self.sampling:.3g})")
