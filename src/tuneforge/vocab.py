"""New tokens (`model.add_tokens`, `model.add_special_tokens`): the tokenizer gains them, the embedding (and output)
matrices gain a row for each, initialised to the mean of the existing rows (a neutral start: a random row would make
the new token's first predictions arbitrary), and with LoRA the two matrices are trained in full (modules_to_save,
filled in by the recipe) — seed 000's common mistake "no LoRA on the embedding when extending vocab".

Everything that loads a run's weights (generate, eval, merge, serve, export) resizes the base to the saved
tokenizer first (`match_vocabulary`), so the adapter's trained rows land on a matrix of the right size.
"""

from __future__ import annotations


def add_tokens(tokenizer, model_section) -> int:
    """Add the recipe's tokens to the tokenizer; the number that were new."""
    added = 0
    if model_section.add_tokens:
        added += tokenizer.add_tokens(list(model_section.add_tokens))
    if model_section.add_special_tokens:
        added += tokenizer.add_special_tokens({"extra_special_tokens": list(model_section.add_special_tokens)},
                                              replace_extra_special_tokens=False)
    return added


def match_vocabulary(model, tokenizer) -> int:
    """Grow the model's embedding (and untied output) rows to the tokenizer's size, new rows = the old rows' mean;
    the number of rows added (0 when the model already covers the tokenizer)."""
    import torch

    embeddings = model.get_input_embeddings()
    old = embeddings.weight.shape[0]
    if len(tokenizer) <= old:
        return 0
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        grown = model.get_input_embeddings().weight
        grown[old:] = grown[:old].mean(dim=0, keepdim=True)
        output = model.get_output_embeddings()
        if output is not None and output.weight.data_ptr() != grown.data_ptr():
            output.weight[old:] = output.weight[:old].mean(dim=0, keepdim=True)
    return len(tokenizer) - old
