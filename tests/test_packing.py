"""Packing boundaries: tuneforge trains packed data with TRL's padding-free BFD packing (examples concatenated, position
ids restarting at each example, no attention mask). Nothing may leak across an example boundary: not attention
(logits of a packed row equal those of each example alone) and not loss (the first token of each packed example
is never a target of the previous one's last token)."""

from __future__ import annotations

import pytest
import torch

from tuneforge.data.pipeline import to_dataset
from tuneforge.data.template import IGNORE_INDEX, tokenize_example

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Packing puts several short examples into one row.",
    "Position ids restart at zero for every example in the row, so attention stays inside it.",
    "Short one.",
    "A somewhat longer document that talks about tokenizers, templates, masks and the many ways to get them wrong.",
]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
     {"role": "assistant", "content": "Green."}],
    [{"role": "user", "content": "Translate 'cat' to French."}, {"role": "assistant", "content": "chat"}],
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny: one intra-op thread is fastest, and avoids spin-waiting on a loaded machine (10-100x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    from tuneforge.models import load_tokenizer

    return load_tokenizer("embedded:smollm2-135m-instruct")


def tiny_llama(vocab_size: int, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         attn_implementation=attn)
    model = LlamaForCausalLM(config).eval()
    assert model.config._attn_implementation == attn
    return model


@pytest.fixture(scope="module")
def text_items(tok):
    return [tokenize_example(tok, {"text": doc}, 512) for doc in DOCS]


@pytest.fixture(scope="module")
def chat_items(tok):
    return [tokenize_example(tok, {"messages": m}, 512) for m in CHATS]


def forward(model, input_ids, **kwargs):
    # use_cache=False as in training (TRL's SFTTrainer.compute_loss passes it): with a cache, transformers does not
    # derive the per-example mask from the position ids.
    with torch.no_grad():
        return model(input_ids=torch.tensor([input_ids]), use_cache=False, **kwargs)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_logits_equal_each_example_alone(tok, text_items, chat_items, attn):
    model = tiny_llama(len(tok), attn)
    examples = [text_items[0].input_ids, chat_items[1].input_ids, text_items[3].input_ids]
    alone = [forward(model, ids).logits[0] for ids in examples]

    packed_ids = [t for ids in examples for t in ids]
    position_ids = torch.cat([torch.arange(len(ids)) for ids in examples])[None]
    packed = forward(model, packed_ids, position_ids=position_ids).logits[0]
    start = 0
    for ids, logits in zip(examples, alone):
        torch.testing.assert_close(packed[start:start + len(ids)], logits, atol=1e-5, rtol=0)
        start += len(ids)

    # Control: the same row without restarting position ids lets the later examples see the earlier ones, and the
    # comparison above catches it.
    naive = forward(model, packed_ids).logits[0]
    second = naive[len(examples[0]):len(examples[0]) + len(examples[1])]
    assert (second - alone[1]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_trl_bfd_packing_keeps_examples_apart(tok, text_items, chat_items, kind):
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    items = text_items if kind == "text" else chat_items
    max_length = 64 if kind == "text" else 128
    assert all(len(item.input_ids) <= max_length for item in items)
    packed = pack_dataset(to_dataset(items), max_length, "bfd")
    assert len(packed) < len(items)  # something really was packed together
    assert all(sum(row["seq_lengths"]) == len(row["input_ids"]) <= max_length for row in packed)

    collator = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)
    seen = []
    for row in packed:
        batch = collator([row])
        assert "attention_mask" not in batch
        ids, labels, positions = batch["input_ids"][0].tolist(), batch["labels"][0].tolist(), batch["position_ids"][0]
        start = 0
        for length in row["seq_lengths"]:
            segment = slice(start, start + length)
            assert positions[segment].tolist() == list(range(length))
            # The first token of each example is never a target (it would be predicted from the previous example).
            assert labels[start] == IGNORE_INDEX
            (original,) = [item for item in items if item.input_ids == ids[segment]]
            assert labels[start + 1:start + length] == original.labels[1:]
            seen.append(items.index(original))
            start += length
    assert sorted(seen) == list(range(len(items)))  # every example exactly once, none cut

    if kind == "text":  # for CPT the first label is a real token, so the collator's -100 above was not a given
        assert all(item.labels[0] != IGNORE_INDEX for item in items)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_loss_equals_the_per_example_losses(tok, text_items, chat_items, attn):
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = tiny_llama(len(tok), attn)
    items = text_items + chat_items
    packed = pack_dataset(to_dataset(items), 128, "bfd")
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(list(packed))
    with torch.no_grad():
        packed_loss = model(**batch, use_cache=False).loss

    total, count = 0.0, 0
    for item in items:
        targets = sum(label != IGNORE_INDEX for label in item.labels[1:])  # shifted: position 0 is never a target
        loss = forward(model, item.input_ids, labels=torch.tensor([item.labels])).loss
        total += loss.item() * targets
        count += targets
    assert packed_loss.item() == pytest.approx(total / count, abs=1e-5)
