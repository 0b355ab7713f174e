"""Real LM folders: their tokenizers declare no image token, and Llama's has no pad token."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer

from modules.loading import ModelFolderError, load_tokenizer
from stages.run import main
from tests.conftest import MICRO_ARGS


def _plain_copy(lm_folder, folder, **tokenizer_config):
    """The micro LM as a real checkpoint's folder looks: `<image>` is an added token of the vocabulary, but
    the tokenizer declares no image token and, as Llama's, no pad token; `tokenizer_config` sets more."""
    shutil.copytree(lm_folder, folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in ("image_token", "pad_token", "model_specific_special_tokens"):
        config.pop(key, None)
    path.write_text(json.dumps(config | tokenizer_config))
    return folder


@pytest.fixture
def plain_lm(micro_base, tmp_path):
    folder = _plain_copy(micro_base[1], tmp_path / "plain_lm")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert getattr(tokenizer, "image_token", None) is None and tokenizer.pad_token is None
    return folder


def test_image_token_from_the_flag_is_declared_and_saved(plain_lm, tmp_path):
    tokenizer = load_tokenizer(plain_lm, "<image>")
    assert tokenizer.image_token == "<image>"
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(plain_lm)), "no token may be added"
    assert tokenizer.pad_token == "<unk>", "Llama-style: pad with unk"
    tokenizer.save_pretrained(tmp_path / "saved")  # what export writes: it must load on its own
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert (again.image_token, again.pad_token) == ("<image>", "<unk>")
    assert load_tokenizer(plain_lm, "<unk>").pad_token == "<eos>", "unk marks images: pad with eos"


def test_vicuna_style_pad_unk_with_unk_marking_images_pads_with_eos(micro_base, tmp_path):
    folder = _plain_copy(micro_base[1], tmp_path / "vicuna", pad_token="<unk>")
    assert AutoTokenizer.from_pretrained(folder).pad_token == "<unk>"
    tokenizer = load_tokenizer(folder, "<unk>")
    assert (tokenizer.image_token, tokenizer.pad_token) == ("<unk>", "<eos>")


def test_declaring_the_image_token_keeps_the_other_special_tokens(micro_base, tmp_path):
    folder = _plain_copy(micro_base[1], tmp_path / "chat", extra_special_tokens=["<pad>"])  # e.g. <|im_start|>
    tokenizer = load_tokenizer(folder, "<image>")
    assert tokenizer.image_token == "<image>" and {"<pad>", "<image>"} <= set(tokenizer.all_special_tokens)


@pytest.mark.parametrize(
    ("image_token", "message"),
    [
        (None, "declares no image_token. Set --model.image_token"),
        ("<zzz>", "--model.image_token '<zzz>' is not an added token"),
        ("red", "--model.image_token 'red' is not an added token"),  # in the vocabulary, but a word
        ("<eos>", "is also"),
    ],
)
def test_a_bad_image_token_is_named(plain_lm, image_token, message):
    assert "red" in AutoTokenizer.from_pretrained(plain_lm).get_vocab()
    with pytest.raises(ModelFolderError, match=message) as error:
        load_tokenizer(plain_lm, image_token)
    assert str(plain_lm) in str(error.value)


def test_a_declared_image_token_wins(micro_base, caplog, monkeypatch):
    monkeypatch.setattr("modules.loading._WARNED", set())
    assert load_tokenizer(micro_base[1], "<bos>").image_token == "<image>"
    assert load_tokenizer(micro_base[1], "<bos>").image_token == "<image>"
    assert caplog.text.count("--model.image_token '<bos>' is not used") == 1, "once, not at every stage"


def test_curriculum_without_an_image_token_fails_before_any_work(plain_lm, micro_base, tmp_path, capsys):
    args = ["curriculum", f"--run_dir={tmp_path / 'run'}", f"--model.vision_path={micro_base[0]}"]
    assert main([*args, f"--model.lm_path={plain_lm}"]) == 2
    assert "--model.image_token" in capsys.readouterr().err
    assert not (tmp_path / "run" / "data").exists()


def test_an_image_token_past_the_embedding_rows_fails_before_the_data(micro_base, tmp_path, capsys):
    # It failed when the first stage built the model: after the data stage, hours with a captioner.
    lm = tmp_path / "lm"
    shutil.copytree(micro_base[1], lm)
    image_id = load_tokenizer(lm).convert_tokens_to_ids("<image>")
    config = json.loads((lm / "config.json").read_text())
    (lm / "config.json").write_text(json.dumps({**config, "vocab_size": image_id}))
    args = ["curriculum", f"--run_dir={tmp_path / 'run'}", f"--model.vision_path={micro_base[0]}"]
    assert main([*args, f"--model.lm_path={lm}"]) == 2
    assert f"has id {image_id}, past the LM's {image_id} embedding rows" in capsys.readouterr().err
    assert not (tmp_path / "run" / "data").exists()


# ChatML, as Qwen2.5-instruct's tokenizer has it.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _chat_copy(plain_lm, folder, template=CHATML):
    """An instruct LM's folder: ChatML's turn tokens in the vocabulary (the LM's embeddings grown to fit),
    and a chat template."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(plain_lm, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    lm = AutoModelForCausalLM.from_pretrained(folder)
    lm.resize_token_embeddings(len(tokenizer))
    lm.save_pretrained(folder)
    return folder


def test_chat_template_frames_prompt_and_caption_as_a_turn(plain_lm, tmp_path):
    from datamodules.captions import IGNORE_INDEX, PromptFormat

    tokenizer = load_tokenizer(_chat_copy(plain_lm, tmp_path / "instruct"), "<image>")
    start, end, image = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<image>"])
    fmt = PromptFormat(tokenizer, 3, "describe the image", chat_template=True)
    ids, labels = fmt.encode("a red circle")
    caption = tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    # <|im_start|> user \n <image> x3 \n prompt <|im_end|> \n <|im_start|> assistant \n | caption <|im_end|>
    prefix = fmt.prefix()
    assert prefix[0] == start and prefix.count(start) == 2 and prefix.count(end) == 1
    at = prefix.index(image)
    assert prefix[at : at + 3] == [image] * 3 and prefix.count(image) == 3
    assert ids == prefix + caption + [end]
    assert labels == [IGNORE_INDEX] * len(prefix) + caption + [end], "loss on the reply and its end of turn"
    assert fmt.stop_ids == [end, tokenizer.eos_token_id]
    question = fmt.asking("is there a circle").prefix()
    assert question[: at + 3] == prefix[: at + 3] and question != prefix

    plain = PromptFormat(tokenizer, 3, "describe the image")  # the default layout is unchanged
    assert plain.prefix()[:4] == [tokenizer.bos_token_id, image, image, image]
    assert plain.end_ids == [tokenizer.eos_token_id]


@pytest.mark.parametrize(
    ("template", "message", "image_token"),
    [
        (None, "--model.chat_template: .* has no chat template", "<image>"),
        (CHATML.replace("assistant\n{% endif %}", "reply: {% endif %}"), "not write the reply right after", "<image>"),
        (CHATML.replace("{{ m['content'] }}", "{{ m['content'] | replace('<image>', '') }}"), "not keep", "<image>"),
        # The template's own end of turn taken for the image token: it said the template did not keep it once.
        (CHATML, r"holds the image token '<\|im_end\|>' 2 times \(is it one of the template's own", "<|im_end|>"),
    ],
)  # fmt: skip
def test_a_chat_template_that_cannot_frame_captions_is_named(plain_lm, tmp_path, template, message, image_token):
    from modules.loading import ModelConfig, check_prompt

    folder = _chat_copy(plain_lm, tmp_path / "instruct", template) if template else plain_lm
    tokenizer = load_tokenizer(folder, image_token)
    check_prompt(tokenizer, ModelConfig())  # the plain layout needs no template
    with pytest.raises(ModelFolderError, match=message):
        check_prompt(tokenizer, ModelConfig(chat_template=True))


@pytest.mark.slow
def test_curriculum_and_export_with_a_plain_instruct_tokenizer(plain_lm, micro_base, micro_world, tmp_path):
    # A real instruct LM's folder: no image token declared, no pad token, a chat template.
    from datamodules.captions import PromptFormat
    from stages.export import evaluate_model, export_model, find_stage, load_exported

    lm = _chat_copy(plain_lm, tmp_path / "instruct")
    run_dir = tmp_path / "run"
    args = ["curriculum", f"--run_dir={run_dir}", *MICRO_ARGS, f"--data.shard_dir={micro_world}"]
    args += [f"--model.vision_path={micro_base[0]}", f"--model.lm_path={lm}", "--model.image_token=<image>"]
    assert main([*args, "--model.chat_template=true"]) == 0
    out = export_model(find_stage(run_dir), tmp_path / "exported")
    model, exported, _ = load_exported(out)
    assert (exported.image_token, exported.pad_token) == ("<image>", "<unk>")
    # The exported model lays out its prompt as training did: the chat template, saved with the tokenizer.
    trained = PromptFormat(exported, model.config.num_image_tokens, model.config.prompt, chat_template=True)
    assert model.config.chat_template and model.prompt_ids(exported) == trained.prefix()
    assert model.stop_ids(exported) == [exported.convert_tokens_to_ids("<|im_end|>"), exported.eos_token_id]
    assert evaluate_model(out, limit=4, max_new_tokens=6)["data"]["images"] == 4


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_a_full_clip_or_siglip_checkpoint_gives_its_vision_half(family, micro_base, tmp_path):
    # Real towers come as whole CLIP / SigLIP checkpoints (text half included): the loader keeps the
    # vision model, with the checkpoint's trained weights.
    import torch
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipConfig, SiglipImageProcessor, SiglipModel

    from modules.loading import ModelConfig, build_vlm

    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    vision |= {"image_size": 32, "patch_size": 8}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    torch.manual_seed(0)
    if family == "clip":
        full = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        full = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    full.save_pretrained(tmp_path / family)
    processor.save_pretrained(tmp_path / family)

    vlm, _, loaded = build_vlm(ModelConfig(grid=None, vision_layer=-2), tmp_path / family, micro_base[1])
    assert type(vlm.vision).__name__ == {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}[family]
    assert vlm.vision.state_dict().keys() == full.vision_model.state_dict().keys()
    for name, tensor in full.vision_model.state_dict().items():
        torch.testing.assert_close(vlm.vision.state_dict()[name], tensor, rtol=0, atol=0)
    pixels = loaded([Image.new("RGB", (40, 40))], return_tensors="pt")["pixel_values"]
    with torch.no_grad():  # 16 patches; CLIP's class token dropped
        assert vlm.image_embeddings(pixels).shape == (1, 16, vlm.lm.config.hidden_size)
    # Loading the weights draws no random numbers: the vision class was built, randomly initialised, just
    # to learn its type, and the projector's initial weights then depended on the folder's layout.
    from modules.loading import load_vision_tower

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_vision_tower(tmp_path / family)
    assert torch.equal(torch.rand(3), expected)
    # random_init of a whole checkpoint (a profile with --model.random_init true and its real folder):
    # the concrete vision classes have no from_config, and it failed with an AttributeError.
    random_vlm, _, _ = build_vlm(ModelConfig(grid=None, random_init=True), tmp_path / family, micro_base[1])
    assert type(random_vlm.vision) is type(vlm.vision)
    weight = next(key for key, value in vlm.vision.state_dict().items() if value.dim() >= 2)
    assert not torch.equal(random_vlm.vision.state_dict()[weight], vlm.vision.state_dict()[weight])


def test_every_row_must_hold_one_images_placeholders(micro_base):
    # A row with two images' placeholders beside a row with none matched the batch's total, and the second
    # image's features were placed in the first row without a word.
    import pytest
    import torch

    from modules.loading import ModelConfig, build_vlm, count_image_tokens

    vlm, tokenizer, processor = build_vlm(ModelConfig(), *micro_base)
    n = count_image_tokens(vlm, processor)
    side = processor.crop_size["height"]
    word = tokenizer.convert_tokens_to_ids("red")
    rows = torch.tensor([[vlm.image_token_id] * (2 * n) + [word], [word] * (2 * n + 1)])
    with pytest.raises(ValueError, match=r"rows hold \[18, 0\] <image> placeholders"):
        vlm.embed(rows, torch.rand(2, 3, side, side))
    good = torch.tensor([[vlm.image_token_id] * n + [word]] * 2)
    assert vlm.embed(good, torch.rand(2, 3, side, side)).shape[:2] == (2, n + 1)


def _byte_level_tokenizer():
    """A Qwen2.5-style byte-level BPE (no merges: one token a byte): words carry no start marker of their own."""
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               unk_token=None, bos_token=None)  # fmt: skip
    tokenizer.add_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>")])
    tokenizer.image_token = "<|image_pad|>"
    return tokenizer


def test_the_plain_layout_keeps_prompt_and_caption_apart_for_byte_level_tokenizers(micro_base):
    # Prompt and caption are tokenized apart: for Qwen's (and Gemma's) tokenizers, which mark no word start,
    # the model trained on "describe the imagea red circle".
    from datamodules.captions import PromptFormat
    from modules.loading import load_tokenizer

    tokenizer = _byte_level_tokenizer()
    ids, labels = PromptFormat(tokenizer, 2, "describe the image").encode("a red circle")
    assert tokenizer.decode(ids) == "<|image_pad|><|image_pad|>describe the image a red circle<|im_end|>"
    assert tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != -100]).strip() == (
        "a red circle<|im_end|>"
    )
    assert PromptFormat(tokenizer, 2, "").encode("a red")[0][2:4] == tokenizer("a ")["input_ids"][:2], "no prompt"
    # A normalizer that strips the space: refused, not trained glued.
    from tokenizers import normalizers

    tokenizer.backend_tokenizer.normalizer = normalizers.Strip()
    with pytest.raises(ValueError, match="--model.prompt: .* joins the prompt's last word and the caption's first"):
        PromptFormat(tokenizer, 2, "describe the image")
    # The world's word-level tokenizer is unchanged (its golden curves with it).
    world = load_tokenizer(micro_base[1])
    fmt = PromptFormat(world, 9, "describe the image")
    assert fmt._lead == "" and fmt.encode("a red circle")[0][-4:-1] == world("a red circle")["input_ids"][-3:]


def test_pad_to_square_keeps_a_wide_images_sides_that_a_centre_crop_cuts(micro_base, tmp_path):
    # CLIP's processor resizes the short side and crops the centre: a 4:1 image with a red left end and a blue
    # right end lost both, which its caption may describe. LLaVA-1.5 pads to a square with the mean colour.
    from PIL import Image
    from transformers import CLIPImageProcessor

    from modules.modeling_vlm_curriculum import SquareImages, pad_to_square

    wide = Image.new("RGB", (128, 32), (128, 128, 128))
    wide.paste((255, 0, 0), (0, 0, 16, 32))
    wide.paste((0, 0, 255), (112, 0, 128, 32))
    clip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})

    def reds_and_blues(processor) -> tuple[int, int]:
        pixels = processor([wide], return_tensors="pt")["pixel_values"][0]
        red, blue = (pixels[0] > 1.5) & (pixels[2] < 0), (pixels[2] > 1.5) & (pixels[0] < 0)
        return int(red.sum()), int(blue.sum())

    assert reds_and_blues(clip) == (0, 0)
    padded = SquareImages(clip)
    assert min(reds_and_blues(padded)) > 0
    assert padded.crop_size == clip.crop_size and padded.fill == (123, 117, 104)  # CLIP's mean colour
    square = Image.new("RGB", (32, 32), (9, 9, 9))
    pixels = [processor([square], return_tensors="pt")["pixel_values"] for processor in (padded, clip)]
    assert (pixels[0] == pixels[1]).all(), "a square image is left as it is"
    # Other modes are padded with the same colour; it pickles and copies (spawned loader workers, deepcopy).
    import copy
    import pickle

    rgba = Image.new("RGBA", (64, 32), (255, 0, 0, 255))
    assert padded.fill == pad_to_square(rgba, padded.fill).getpixel((0, 0))
    for clone in (pickle.loads(pickle.dumps(padded)), copy.deepcopy(padded)):
        assert clone.fill == padded.fill and clone.crop_size == clip.crop_size
    with pytest.raises(TypeError, match="pad_to_square takes PIL images, got ndarray"):
        padded([np.zeros((8, 16, 3), dtype=np.uint8)])
    # The model flag wraps the processor wherever the model is built.
    from modules.loading import ModelConfig, build_vlm

    assert isinstance(build_vlm(ModelConfig(pad_to_square=True), *micro_base)[2], SquareImages)
    assert not isinstance(build_vlm(ModelConfig(), *micro_base)[2], SquareImages)


def test_declaring_the_image_token_keeps_a_plain_tokenizer_beside_any_config(plain_lm, tmp_path):
    """`--model.image_token` loaded through AutoTokenizer, which goes by the config's model type: beside a qwen2
    config, a plain `tokenizers` tokenizer was rebuilt as a byte-level BPE (every caption a few "a" tokens)."""
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "qwen2_lm"
    shutil.copytree(plain_lm, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    tokenizer = load_tokenizer(folder, "<image>")
    text = "a red circle"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == PreTrainedTokenizerFast.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 and tokenizer.unk_token_id not in ids, "the world's word-level tokenizer: a token a word"


def test_a_pad_token_added_to_the_tokenizer_alone_fails_before_the_data(plain_lm, micro_base, tmp_path, capsys):
    """A `[PAD]` added to a Llama tokenizer without resizing the model failed at the first step (IndexError)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(plain_lm)
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokenizer.save_pretrained(plain_lm)
    args = ["curriculum", f"--run_dir={tmp_path / 'run'}", f"--model.vision_path={micro_base[0]}"]
    assert main([*args, f"--model.lm_path={plain_lm}", "--model.image_token=<image>"]) == 2
    err = capsys.readouterr().err
    assert f"the pad token '[PAD]' has id {len(tokenizer) - 1}, past the LM's" in err, err
    assert not (tmp_path / "run" / "data").exists()


def test_a_tokenizer_without_an_eos_token_is_named(plain_lm):
    """Every batch failed with "Could not infer dtype of NoneType": a caption had no end token."""
    from modules.loading import ModelConfig, check_prompt

    tokenizer = load_tokenizer(plain_lm, "<image>")
    tokenizer.eos_token = None
    with pytest.raises(ModelFolderError, match="the tokenizer has no eos token to end a caption with"):
        check_prompt(tokenizer, ModelConfig())
    from modules.modeling_vlm_curriculum import stop_ids

    assert stop_ids([7], None) == [7], "a chat template's turn end alone: generate refused [7, None]"


def test_a_chat_template_that_prints_the_date_gives_one_layout(plain_lm, tmp_path):
    """Llama-3's template prints strftime_now's date unless given a date_string: the prompt changed with the
    day it was rendered (training, eval and later inference disagreed). Here it prints the time to the
    microsecond, so that without a fixed date two renders always differ."""
    from modules.modeling_vlm_curriculum import prompt_layout

    dated = (
        "{% if date_string is not defined %}{% set date_string = strftime_now('%H:%M:%S.%f') %}{% endif %}"
        "<|im_start|>system\ntoday {{ date_string }}<|im_end|>\n" + CHATML
    )
    tokenizer = load_tokenizer(_chat_copy(plain_lm, tmp_path / "dated", dated), "<image>")
    layouts = [prompt_layout(tokenizer, 3, "describe the image", chat_template=True) for _ in range(3)]
    assert layouts[0] == layouts[1] == layouts[2]


def test_lora_on_a_tied_embedding_is_refused_before_any_work(tmp_path):
    # Qwen2.5-0.5B and Gemma tie lm_head to embed_tokens: merged for the export, an lm_head adapter changed the
    # input embeddings too, and the export generated other captions than the trained model (8 of 8).
    from types import SimpleNamespace

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from modules.handoff import attach_lora
    from modules.loading import LoraSpec, check_lora_targets

    for tied in (True, False):
        config = Qwen2Config(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, tie_word_embeddings=tied,
        )  # fmt: skip
        Qwen2ForCausalLM(config).save_pretrained(tmp_path / str(tied))
    spec = LoraSpec(target_modules=["q_proj", "lm_head"])
    with pytest.raises(ModelFolderError, match=r"--model.lora.target_modules: \['lm_head'\] of .*share one weight"):
        check_lora_targets(tmp_path / "True", spec)
    check_lora_targets(tmp_path / "True", LoraSpec(target_modules=["q_proj", "v_proj"]))
    check_lora_targets(tmp_path / "False", spec)  # untied: an lm_head adapter merges into lm_head alone
    with pytest.raises(ValueError, match=r"\['embed_tokens', 'lm_head'\]: its input and output embeddings"):
        lm = Qwen2ForCausalLM.from_pretrained(tmp_path / "True")
        attach_lora(SimpleNamespace(lm=lm), LoraSpec(target_modules=["embed_tokens", "lm_head"]))


def test_a_prompt_holding_the_image_token_is_refused_before_any_work(micro_base):
    """The plain layout took "<image> describe the image" as one placeholder more than the tower gives: the first
    batch failed ("the batch's rows hold [4] <image> placeholders")."""
    from modules.loading import ModelConfig, check_prompt

    tokenizer = load_tokenizer(micro_base[1])
    with pytest.raises(ModelFolderError, match="--model.prompt '<image> describe the image' holds the image token"):
        check_prompt(tokenizer, ModelConfig(prompt="<image> describe the image"))
    check_prompt(tokenizer, ModelConfig())
