"""A tiny LLaVA with real weights, trained on CIFAR-10 questions, for tpc's VLM accuracy report.

The stock ``LlavaForConditionalGeneration`` (SDPA): its vision tower is a transformers
``ViTModel`` holding the trained CIFAR-10 ViT of ../shared/data (timm VisionTransformer,
32 px, patch 4, dim 128, 4 blocks; converted weight for weight, see ``tower_from_timm``),
LLaVA's two-layer GELU projector, and a Llama decoder (hidden 128, 3 layers, 4 heads, MLP 256). LLaVA
takes the tower's penultimate layer (``vision_feature_layer=-2``, as LLaVA-1.5) without its
[CLS] ("default" strategy): 64 visual tokens per image. The tokenizer is a word-level
``PreTrainedTokenizerFast`` over 25 words: the special tokens, ``<image>``, the question
words, yes, no and the ten class names.

Prompts are ``<bos> <image>×64 what is in the picture ?`` → the class name, and
``<bos> <image>×64 is there a {class} ?`` → yes / no, each answer followed by ``<eos>``.
Training (images 0–7999 of ../shared/data/cifar10_test.npz): the tower is frozen and its
features are computed once; the projector and the decoder (embeddings, layers, head) learn
from the cross-entropy of the answer token and the ``<eos>`` after it. Every epoch draws new
yes/no questions: per image, yes or no with probability 1/2, a "no" asking about one of the
other nine classes uniformly. Seeded and deterministic for a given thread count.

    OMP_NUM_THREADS=2 python benchmarks/train_tiny_vlm.py [--out DIR] [--threads 1]

It writes the model's and the tokenizer's ``save_pretrained`` files and ``train.json`` (recipe,
wall time, loss and training accuracy per epoch) to DIR, default ``benchmarks/tiny_vlm``: the
run docs/vlm.md reports is committed there (4.3 MB), and benchmarks/tiny_vlm_accuracy.py
trains it there first when it is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.cifar_vit import CONFIG as VIT, DATA, MEAN, STD, WEIGHTS  # noqa: E402

CACHE = Path(__file__).resolve().parent / "tiny_vlm"
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>", "<image>"]
QUESTION_WORDS = ["what", "is", "in", "the", "picture", "?", "there", "a", "yes", "no"]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PAD, BOS, EOS, UNK, IMAGE = range(5)
FEATURE_LAYER = -2  # LLaVA-1.5's choice: the tower's penultimate layer
VISUAL = (VIT["img_size"] // VIT["patch_size"]) ** 2  # 64 patches; the [CLS] is dropped ("default")
WHAT = "what is in the picture ?"
TRAIN = range(0, 8000)
RECIPE = dict(seed=0, epochs=6, batch=64, lr=2e-3, weight_decay=0.01, warmup_steps=100,
              text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=4))


def is_there(name: str) -> str:
    return f"is there a {name} ?"


def tokenizer():
    """Word-level tokenizer: ids 0-4 the special tokens, then the question words and the class names."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + QUESTION_WORDS + CLASSES)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<image>"], padding_side="left")


def prompt(question: str) -> str:
    """The text of one prompt: ``<bos>``, one image's placeholders (one per visual token), the question."""
    return " ".join(["<bos>"] + ["<image>"] * VISUAL + [question])


def pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 32, 32, 3] → normalised float [N, 3, 32, 32], as the CIFAR ViT was trained."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def processor(tok, images: np.ndarray, questions: list[str]) -> dict:
    """Processor-like outputs (``input_ids``, ``attention_mask``, ``pixel_values``) for image + question pairs."""
    text = tok([prompt(q) for q in questions], return_tensors="pt", padding=True, add_special_tokens=False)
    return {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"], "pixel_values": pixels(images)}


def vit_config():
    from transformers import ViTConfig

    return ViTConfig(hidden_size=VIT["embed_dim"], num_hidden_layers=VIT["depth"], num_attention_heads=VIT["num_heads"],
                     intermediate_size=int(VIT["embed_dim"] * VIT["mlp_ratio"]), image_size=VIT["img_size"],
                     patch_size=VIT["patch_size"], hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)


def tower_from_timm(state: dict) -> dict:
    """The timm VisionTransformer's state_dict as transformers ``ViTModel`` weights (same math:
    pre-norm blocks, exact GELU, LayerNorm eps 1e-6; timm's fused qkv split into q, k, v)."""
    out = {"embeddings.cls_token": state["cls_token"], "embeddings.position_embeddings": state["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"]}
    for i in range(VIT["depth"]):
        src, dst = f"blocks.{i}.", f"layers.{i}."
        for name, new in (("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
            for p in ("weight", "bias"):
                out[f"{dst}{new}.{p}"] = state[f"{src}{name}.{p}"]
        for p in ("weight", "bias"):
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), state[f"{src}attn.qkv.{p}"].chunk(3)):
                out[f"{dst}attention.{proj}.{p}"] = part
            out[f"{dst}attention.o_proj.{p}"] = state[f"{src}attn.proj.{p}"]
            out[f"{dst}mlp.fc1.{p}"] = state[f"{src}mlp.fc1.{p}"]
            out[f"{dst}mlp.fc2.{p}"] = state[f"{src}mlp.fc2.{p}"]
    return out


def timm_weights() -> dict:
    return torch.load(WEIGHTS, map_location="cpu", weights_only=True)


def build(seed: int = 0, text: dict | None = None):
    """The untrained LLaVA: the CIFAR ViT as its tower, a seeded random projector and decoder."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    text_config = LlamaConfig(**(text or RECIPE["text"]), vocab_size=len(SPECIAL + QUESTION_WORDS + CLASSES),
                              max_position_embeddings=128, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                              tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vit_config(), text_config=text_config, image_token_id=IMAGE,
                         image_seq_length=VISUAL, vision_feature_layer=FEATURE_LAYER,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         attn_implementation="sdpa")
    model = LlavaForConditionalGeneration(config).eval()
    missing, unexpected = model.model.vision_tower.load_state_dict(tower_from_timm(timm_weights()), strict=False)
    if unexpected or set(missing) - {"pooler.dense.weight", "pooler.dense.bias"}:
        raise RuntimeError(f"tower conversion: missing {missing}, unexpected {unexpected}")
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD, EOS
    model.generation_config.bos_token_id = BOS
    return model


def load_data(indices: range) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(DATA)
    return data["images"][indices.start:indices.stop], data["labels"][indices.start:indices.stop]


def yes_no(labels: np.ndarray, gen: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the class asked about and whether the answer is yes: yes with probability 1/2,
    a "no" asking about one of the other nine classes uniformly."""
    yes = gen.random(len(labels)) < 0.5
    other = (labels + gen.integers(1, 10, len(labels))) % 10
    return np.where(yes, labels, other), yes


def eval_questions(labels: np.ndarray, seed: int = 1) -> tuple[list[str], list[str]]:
    """Both questions for every image, in a fixed seeded draw: (questions, answers), what-questions first."""
    asked, yes = yes_no(labels, np.random.default_rng(seed))
    questions = [WHAT] * len(labels) + [is_there(CLASSES[c]) for c in asked]
    answers = [CLASSES[c] for c in labels] + ["yes" if y else "no" for y in yes]
    return questions, answers


@torch.no_grad()
def tower_features(model, images: np.ndarray, batch: int = 500) -> torch.Tensor:
    """The frozen tower's features LLaVA projects: layer ``FEATURE_LAYER``, [CLS] dropped; [N, 64, 128]."""
    tower = model.model.vision_tower
    out = [tower(pixels(images[i:i + batch]), output_hidden_states=True).hidden_states[FEATURE_LAYER][:, 1:]
           for i in range(0, len(images), batch)]
    return torch.cat(out)


def question_ids(tok, questions: list[str]) -> torch.Tensor:
    return torch.tensor([tok.convert_tokens_to_ids(q.split()) for q in questions])


def answer_loss(model, features: torch.Tensor, text: torch.Tensor, answers: torch.Tensor) -> tuple:
    """Cross-entropy of the answer token and the <eos> after it. The prompt is laid out as the
    processor lays it out (bos, the projected image features at the placeholders, the question,
    the answer), so the embeddings equal LLaVA's masked_scatter of the features into the prompt."""
    lm, head = model.model.language_model, model.lm_head
    embed = lm.get_input_embeddings()
    n = features.shape[0]
    bos = embed(torch.full((n, 1), BOS))
    tail = embed(torch.cat([text, answers[:, None]], 1))
    hidden = lm(inputs_embeds=torch.cat([bos, model.model.multi_modal_projector(features), tail], 1)).last_hidden_state
    logits = head(hidden[:, -2:])
    target = torch.stack([answers, torch.full_like(answers, EOS)], 1)
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    return loss, int((logits[:, 0].argmax(-1) == answers).sum())


def train(out: Path, recipe: dict = RECIPE, log=print) -> Path:
    """Train the tiny LLaVA and save it to ``out`` (written to a temporary directory, then moved into place)."""
    start = time.perf_counter()
    tok = tokenizer()
    model = build(recipe["seed"], recipe["text"])
    images, labels = load_data(TRAIN)
    features = tower_features(model, images)
    log(f"tower features {tuple(features.shape)} in {time.perf_counter() - start:.0f} s")
    trained = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(trained, lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    steps_per_epoch = math.ceil(2 * len(labels) / recipe["batch"])
    total = recipe["epochs"] * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1, (s + 1) / recipe["warmup_steps"]) * 0.5
                                                 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = np.random.default_rng(recipe["seed"])
    torch.manual_seed(recipe["seed"])
    what = question_ids(tok, [WHAT])[0]
    is_there_ids = question_ids(tok, [is_there(c) for c in CLASSES])
    class_ids = torch.tensor(tok.convert_tokens_to_ids(CLASSES))
    yes_id, no_id = tok.convert_tokens_to_ids(["yes", "no"])
    history = []
    model.train()
    for epoch in range(recipe["epochs"]):
        asked, yes = yes_no(labels, gen)
        kinds = [(what.expand(len(labels), -1), class_ids[labels]),  # the two question types, each its own batches
                 (is_there_ids[asked], torch.where(torch.from_numpy(yes), yes_id, no_id))]
        orders = [torch.from_numpy(gen.permutation(len(labels))) for _ in kinds]
        batches = [(kind, orders[kind][i:i + recipe["batch"]])
                   for kind in range(2) for i in range(0, len(labels), recipe["batch"])]
        running, right = 0.0, 0
        for j in gen.permutation(len(batches)):
            kind, b = batches[j]
            text, answer = kinds[kind]
            loss, correct = answer_loss(model, features[b], text[b], answer[b])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running, right = running + float(loss.detach()) * len(b), right + correct
        history.append({"loss": round(running / (2 * len(labels)), 4),
                        "train_answer_accuracy": round(right / (2 * len(labels)), 4)})
        log(f"epoch {epoch + 1}/{recipe['epochs']}: {history[-1]} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    wall = time.perf_counter() - start
    info = {"recipe": recipe, "wall_s": round(wall, 1), "threads": torch.get_num_threads(), "epochs": history,
            "train_images": [TRAIN.start, TRAIN.stop], "torch": torch.__version__}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        tmp.chmod(0o755)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "train.json").write_text(json.dumps(info, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"trained in {wall:.0f} s with {torch.get_num_threads()} thread(s); saved to {out}")
    return out


def load(path: Path = CACHE):
    """(model, tokenizer) from a directory ``train`` wrote; SDPA attention."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CACHE, help="directory to save the trained model in")
    parser.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the recorded run: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    train(args.out, {**RECIPE, "epochs": args.epochs})


if __name__ == "__main__":
    main()
