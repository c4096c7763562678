import pytest

from data_prep.train_tokenizer import train_tokenizer
from megapatch.data.tokenizer import SentencePieceTokenizer
from tests.data.helpers import synthetic_text


@pytest.fixture(scope="session")
def tiny_tokenizer_model() -> bytes:
    """A 400-piece BPE model trained the way `megapatch prep` trains (about 0.5 s)."""
    return train_tokenizer([synthetic_text(seed, 4000) for seed in range(5)], vocab_size=400)


@pytest.fixture()
def tiny_tokenizer(tiny_tokenizer_model) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(tiny_tokenizer_model, source="tiny.model")
