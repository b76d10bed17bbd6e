"""The research surface's model side: the GPT, its optimizers and its training recipe.

The harness (train.py) uses exactly this interface, and nothing else from model/:

    recipe = build_recipe(preset, device, vocab_size, compile)  # a Recipe
    recipe.model                      # the nn.Module (its state is saved and restored)
    recipe.optimizers                 # list of torch optimizers (state saved and restored)
    recipe.batch_shape(progress)      # (batch_size, seq_len) for the next step
    recipe.train_step(x, y, progress) # one optimizer step; returns the loss, detached
                                      # (under torchrun: this rank's rows of the batch)
    recipe.logits(x)                  # fp32 logits (B, T, vocab_size) for evaluation
    recipe.flops_per_token()          # training FLOPs per token, for MFU

progress is the fraction of the run's budget spent, in [0, 1]. Everything behind this
interface is free to change.
"""

from model.recipe import PRESETS, Recipe, build_recipe

__all__ = ["PRESETS", "Recipe", "build_recipe"]
