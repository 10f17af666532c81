"""`streamsvd demo`: plain SVD and the default method at the same ratio, side by side with
the original, on the bundled SmolLM2-135M: what the calibration buys, on a laptop CPU (its
time: docs/results.md#the-demo)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_PROMPTS = ["What is the capital of France?", "Name three colours.",
                "Give me a tip for sleeping better."]  # fmt: skip
DEMO_RATIO = 0.2  # P1's lightest ratio; the README shows what it prints
DEMO_REFINE_EPOCHS = 4  # a quarter of compress's default, to keep the demo short


def demo(out: str, ratio: float, method: str, refine_epochs: int, calib: str | None,
         data: str | None, nsamples: int, seqlen: int, windows: int, batch_size: int,
         device: str, prompt: list[str]) -> None:  # fmt: skip
    """Compress three ways (cli.py's demo options say what each argument is), then print
    each model's perplexity on `data` and its replies to `prompt`."""
    from .default_model import default_model_path
    from .evaluate import load_any, text_windows
    from .model import load_tokenizer

    log.info("no --model given: using the bundled SmolLM2-135M-Instruct")
    model = str(default_model_path())
    tokenizer = load_tokenizer(model)
    calib, calib_label = _calibration_text(calib, tokenizer, Path(out))
    # plain SVD, the closed form, the closed form refined block by block
    runs = {"svd": ("svd", 0), method: (method, 0),
            f"{method}+refine": (method, refine_epochs)}  # fmt: skip
    outputs = {"original": model}
    for label, (run_method, epochs) in runs.items():
        outputs[f"{label} {ratio}"] = _compress(model, Path(out) / label, label, ratio,
                                                run_method, epochs, calib, nsamples, seqlen,
                                                batch_size, device)  # fmt: skip
    win = text_windows(model, data, seqlen, windows)
    width = max(map(len, outputs))  # one column for every label and number
    _print_perplexities(outputs, win, data, batch_size, device, width)
    models = {label: load_any(path, device) for label, path in outputs.items()}
    _print_replies(models, tokenizer, prompt, width)
    print(
        f"\nsvd: W's own best rank-r approximation, blind to data. {method}: the "
        "closed-form factorisation that keeps each layer's outputs on the calibration text "
        f"(SVD-LLM), from {nsamples} windows of {seqlen} tokens of "
        f"{calib_label or 'Python docstrings'}. {method}+refine: the same, then each "
        f"block's factors trained for {refine_epochs} epochs to reproduce the original "
        f"block's outputs. All keep the same parameters; outputs in {out}/."
    )


def _calibration_text(calib: str | None, tokenizer, out: Path) -> tuple[str | None, str | None]:
    """(the calibration text to compress with, what to call it): an instruct model with no
    text given calibrates on the default docstrings, each as a chat answer."""
    if calib is not None or not tokenizer.chat_template:
        return calib, calib
    from .calib import as_chat, load_text

    out.mkdir(parents=True, exist_ok=True)
    chats = out / "calib-chat.txt"
    chats.write_text(as_chat(load_text(None)[0], tokenizer), encoding="utf-8")
    return str(chats), "Python docstrings, each as a chat answer"


def _compress(model: str, out: Path, label: str, ratio: float, method: str, epochs: int,
              calib: str | None, nsamples: int, seqlen: int, batch_size: int,
              device: str) -> str:  # fmt: skip
    """One of the demo's compressions, afresh; prints its time, size and peak memory."""
    from .config import CompressConfig
    from .run import compress

    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(f"{out}.work", ignore_errors=True)
    print(f"compressing with {label} at ratio {ratio} ...", flush=True)
    summary = compress(CompressConfig(model=model, out=str(out), ratio=ratio, method=method,
                                      calib=calib, nsamples=nsamples, seqlen=seqlen,
                                      batch_size=batch_size, device=device,
                                      refine_epochs=epochs))  # fmt: skip
    print(
        f"  {summary['seconds']:.0f}s, linear parameters "
        f"{summary['linear_params_after'] / summary['linear_params_before']:.0%} "
        f"of the original's, peak RSS {summary['peak_rss_mb']:.0f} MB"
    )
    return str(out)


def _print_perplexities(outputs: dict[str, str], win, data: str | None, batch_size: int,
                        device: str, width: int) -> None:  # fmt: skip
    from .evaluate import perplexity

    where = f"{win.shape[0]} windows × {win.shape[1]} tokens of {data or 'Python help topics'}"
    print(
        f"\nperplexity on {where} (lower is better; how well each model predicts text it "
        "was not calibrated on):"
    )
    for label, path in outputs.items():
        ppl = perplexity(path, win, batch_size, device, progress=False)
        print(f"  {label:<{width}} {ppl:12.2f}")


def _print_replies(models: dict, tokenizer, prompts: list[str], width: int) -> None:
    from .evaluate import generate

    for prompt in prompts:
        print(f"\nreply to {prompt!r} (greedy, through the chat template, 40 tokens at most):")
        for label, loaded in models.items():
            text = generate(loaded, tokenizer, prompt, chat=True)
            print(f"  {label:<{width}} {text.strip()!r}")
