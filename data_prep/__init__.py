"""Corpus preparation: raw text → sentencepiece tokenizer → indexed token shards.

    megapatch prep corpus/*.jsonl.zst --vocab-size 32000 --out data/mycorpus
    megapatch prep --sample shakespeare --out data/shakespeare

The output directory holds `train-NNNNN.bin/.idx`, `valid-NNNNN.bin/.idx`,
`tokenizer.model` and `manifest.json`; `megapatch.data` reads it.
"""

from data_prep.pipeline import PrepConfig, PrepResult, prepare
from data_prep.sample import SAMPLES, fetch_sample
from data_prep.train_tokenizer import train_tokenizer

__all__ = ["PrepConfig", "PrepResult", "prepare", "SAMPLES", "fetch_sample", "train_tokenizer"]
