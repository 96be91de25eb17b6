"""A minimal recipe for testing the `tune` launcher: writes the config it received (and, under torchrun,
the result of an all-reduce across ranks) to `<output_dir>/echo_rank<RANK>.json`."""

import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torchtune import config


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    record = {"config": OmegaConf.to_container(cfg, resolve=True), "world_size": 1, "all_reduce": None}
    rank = int(os.environ.get("RANK", "0"))
    if "WORLD_SIZE" in os.environ:
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")
        value = torch.tensor([float(rank + 1)])
        dist.all_reduce(value)
        record.update(world_size=dist.get_world_size(), all_reduce=value.item())
        dist.destroy_process_group()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"echo_rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    recipe_main()
