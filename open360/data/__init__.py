"""Data recipes to deterministic token shards, and the loader that replays their exact order."""

from open360.data.build import build_shards, merge_parts, shard_dir_name
from open360.data.order import DataOrder, DataOrderMismatchError
from open360.data.recipe import RecipeError, RecipeSpec, load_recipe, recipe_hash
from open360.data.shards import ShardError, ShardSet
from open360.data.sources import SourceError
from open360.data.tokenizer import TokenizerMismatchError

__all__ = [
    "DataOrder",
    "DataOrderMismatchError",
    "RecipeError",
    "RecipeSpec",
    "ShardError",
    "ShardSet",
    "SourceError",
    "TokenizerMismatchError",
    "build_shards",
    "load_recipe",
    "merge_parts",
    "recipe_hash",
    "shard_dir_name",
]
