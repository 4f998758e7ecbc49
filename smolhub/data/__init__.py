"""Data: documents from a source -> token shards on disk -> packed batches for each rank."""
from smolhub.data.loader import PackedLoader
from smolhub.data.prepare import PreparedData, prepare_dataset, training_data, training_tokenizer
from smolhub.data.sources import dataset_identity, default_cache_dir, has_validation_split, iter_documents
from smolhub.data.synthetic import synthetic_stories

__all__ = [
    "PackedLoader", "PreparedData", "prepare_dataset", "dataset_identity", "default_cache_dir",
    "has_validation_split", "iter_documents", "synthetic_stories", "training_data", "training_tokenizer",
]
