"""Cold-start SFT: the pretraining trainer with prompt/completion data and a completion-only loss.

Everything else is the pretraining loop's: every parallel plan, precision, checkpoints and exact
resume. The step's loss is the mean CE over all completion tokens of the global batch, whatever the
plan: each micro-batch's CE is summed and divided by (completion tokens of the global batch) / (dp x
micro-batches), which the trainer's averaging over micro-batches and ranks turns into that mean.
"""
import logging
import os

import torch

from dsv3.config.schema import Config
from dsv3.data.dataset import GlobalSampler
from dsv3.data.tokenizer import eos_id
from dsv3.parallel.mesh import Env
from dsv3.rl.sft_data import SFTDataset, sft_examples
from dsv3.train.trainer import Trainer

log = logging.getLogger("dsv3")


class SFTTrainer(Trainer):
    def __init__(self, cfg: Config, run_dir: str, env: Env, tokenizer):
        self.tokenizer = tokenizer
        super().__init__(cfg, run_dir, env)
        if env.is_main:
            log.info("SFT validation data: %s", self.val_data.describe())

    def make_data(self):
        train, val = sft_examples(self.cfg.sft, self.cfg.tasks)
        eos, seq_len, packing = eos_id(self.tokenizer), self.cfg.data.seq_len, self.cfg.sft.packing
        train, val = (SFTDataset(train, self.tokenizer, eos, seq_len, packing),
                      SFTDataset(val, self.tokenizer, eos, seq_len, packing))
        self.sampler = GlobalSampler(len(train), self.cfg.train.seed)  # global sample index -> row, per epoch
        return train, val

    def _rows(self, data, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        tokens, labels, documents = data.batch(indices)
        dev = self.env.device
        return tokens.to(dev), labels.to(dev), documents.to(dev) if self.cfg.data.document_masks else None

    def _batch(self, first: int, count: int):
        return self._rows(self.train_data, self.sampler(first, count))

    def _val_batch(self, indices: list[int]):
        return self._rows(self.val_data, indices)

    def tokenizer_file(self) -> str:
        """The extended tokenizer, which launch/sft.py writes next to the checkpoints."""
        return os.path.join(self.cfg.checkpoint.dir, "tokenizer.json")

    def loss_normalizer(self, batch_size: int, n_micro: int) -> float:
        counted = self.train_data.label_count(self.sampler(self.state.consumed_samples, batch_size))
        return max(counted, 1) / (self.dp * n_micro)
