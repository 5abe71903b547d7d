"""Training data: pretrain (packed/padded, memmap cache), SFT and DPO (assistant-only labels), batching.

files.py     the data-file catalogue, --data_path resolution, reading jsonl rows (errors name file:line)
cache.py     the on-disk caches: token streams, line indexes, fingerprints, stale-cache listing
pretrain.py  PretrainDataset
chat.py      SFTDataset, DPODataset (chat template rendering, assistant-only labels)
batching.py  pad_collate, train_eval_split, IGNORE_INDEX
mixing.py    MixedRows: a share of general rows drawn into each epoch of a domain run
long_text.py cutting huge rows where tokenising the pieces gives the tokens of the whole
sources.py   offline text sources for the tokenizer and the demo data
"""

from dataset.batching import IGNORE_INDEX, pad_collate, train_eval_split
from dataset.cache import tokenizer_fingerprint
from dataset.chat import DPODataset, SFTDataset
from dataset.files import DataError, iter_documents, resolve_data_path
from dataset.mixing import MixedRows
from dataset.pretrain import PretrainDataset

__all__ = ["DataError", "DPODataset", "IGNORE_INDEX", "MixedRows", "PretrainDataset", "SFTDataset", "iter_documents",
           "pad_collate", "resolve_data_path", "tokenizer_fingerprint", "train_eval_split"]
