"""Hand a pruned model to other tools: a mergekit passthrough recipe, or the Hugging Face Hub with a model card."""
