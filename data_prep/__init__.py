"""Corpus preparation: text → tokenizer (trained or given) → indexed token shards.

    megapatch prep corpus/*.jsonl.zst --vocab-size 32000 --out data/mycorpus
    megapatch prep data/*.parquet --tokenizer path/to/hf-model --out data/mycorpus
    megapatch prep --from-megatron shards/pile_text_document --tokenizer t.json --out data/pile
    megapatch prep --sample shakespeare --out data/shakespeare

The output directory holds `train-NNNNN.bin/.idx`, `valid-NNNNN.bin/.idx`, the tokenizer
in its own form (`tokenizer.model`, or `tokenizer.json` with `tokenizer_config.json`) and
`manifest.json`; `megapatch.data` reads it. docs/data.md is the user's guide.
"""

from data_prep.pipeline import PrepConfig, PrepResult, prepare
from data_prep.sample import SAMPLES, fetch_sample
from data_prep.train_tokenizer import train_tokenizer

__all__ = ["PrepConfig", "PrepResult", "prepare", "SAMPLES", "fetch_sample", "train_tokenizer"]
