"""Training data: pretrain (packed/padded, memmap cache), SFT and DPO (assistant-only labels), batching."""

from dataset.lm_dataset import (DataError, DPODataset, PretrainDataset, SFTDataset, pad_collate, resolve_data_path,
                                tokenizer_fingerprint, train_eval_split)

__all__ = ["DataError", "DPODataset", "PretrainDataset", "SFTDataset", "pad_collate", "resolve_data_path",
           "tokenizer_fingerprint", "train_eval_split"]
