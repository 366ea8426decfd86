"""One llama.cpp ``.gguf`` file from a quantize run, with the solver's codes written as they are.

The quantized linears were solved on a GGUF lattice (``--format gguf:TYPE``, ``quant.lattice``);
their codes and scales are packed into TYPE's blocks (``gguf_blocks``), nothing is quantized
again. Everything else follows llama.cpp's LLaMA layout: tensors named as ``gguf``'s tensor map
says, q/k rows in GGUF's rotary order, norms in float32, the token embedding (and an untied output
head) in the source file's type when the model came from a GGUF (the embedded model does) or in
float16, the hyperparameters and the tokenizer copied from the source GGUF or built from the
checkpoint's ``tokenizer.json``.

The file is written in a staging directory beside the target and renamed into place.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .errors import WorkbenchError
from .export import EXPORT_INFO, ExportInfo, QuantizedCheckpoint, check_save_dir, counted, staging_dir, unique_state
from .gguf_blocks import pack
from .models.loading import EMBEDDED, embedded_gguf
from .quant.weight import QuantizedWeight

FORMAT_GGUF = "gguf"
ARCHITECTURES = ("llama",)            # model_type values written as llama.cpp's "llama"
FILE_TYPES = {"q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
              "q8_0": "MOSTLY_Q8_0", "q2_k": "MOSTLY_Q2_K", "q3_k": "MOSTLY_Q3_K_S", "q4_k": "MOSTLY_Q4_K_S",
              "q5_k": "MOSTLY_Q5_K_S", "q6_k": "MOSTLY_Q6_K"}
# the header and what describes the weights themselves is written anew, the rest is copied
NOT_COPIED = ("GGUF.", "general.file_type", "general.quantization_version")


def gguf_name(model_name: str, lattice: str) -> str:
    return f"{Path(model_name).name or 'model'}-{lattice}.gguf"


def rotary_rows(n_rows: int, n_heads: int) -> torch.Tensor:
    """Row order of a q/k projection in GGUF: per head, the two rotary halves interleaved.

    transformers' LLaMA rotates the halves ``[0, d/2)`` and ``[d/2, d)`` of each head together;
    llama.cpp rotates adjacent pairs. Row ``2 j + t`` of a head in GGUF is row ``t d/2 + j`` here.
    """
    half = n_rows // n_heads // 2
    return torch.arange(n_rows).reshape(n_heads, 2, half).transpose(1, 2).reshape(-1)


def permuted(q: QuantizedWeight, rows: torch.Tensor) -> QuantizedWeight:
    return QuantizedWeight(q.codes[rows], q.scale[rows], q.zero[rows], q.grid)


def check_gguf_model(model) -> None:
    """Refuse, before any work, a model llama.cpp's LLaMA graph would not run as it is."""
    cfg = model.config
    if cfg.model_type not in ARCHITECTURES:
        raise WorkbenchError(f"the GGUF export writes LLaMA-family models ({', '.join(ARCHITECTURES)}); this model "
                             f"is {cfg.model_type!r}: save it as pack-quantized or fake-quant instead")
    rope = rope_parameters(cfg)
    if rope.get("rope_type", "default") != "default":
        raise WorkbenchError(f"the GGUF export writes plain rotary embeddings, not {rope['rope_type']!r} rope "
                             f"scaling; save it as pack-quantized instead")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise WorkbenchError("the GGUF export writes LLaMA layers without biases; this model has some: save it as "
                             "pack-quantized instead")


def rope_parameters(cfg) -> dict:
    """Rotary settings wherever the config keeps them (transformers 5: ``rope_parameters``)."""
    for name in ("rope_parameters", "rope_scaling"):
        value = getattr(cfg, name, None)
        if isinstance(value, dict):
            return value
    return {}


def lattice_of(packed: dict[str, QuantizedWeight]) -> str:
    """The file's type: the lattice of the quantized layers (the most common one)."""
    if not packed:
        raise WorkbenchError("the run quantized no layers, so there is nothing to export; check --max-blocks")
    kinds = Counter(q.grid.lattice for q in packed.values())
    if None in kinds:
        raise WorkbenchError("the layers were quantized on plain integer grids, not on a GGUF lattice; run with "
                             "--format gguf:TYPE so the solver quantizes to what the file stores")
    return kinds.most_common(1)[0][0]


# -- metadata ------------------------------------------------------------------------------------

def source_gguf(model_name: str) -> Path | None:
    """The GGUF file a model came from (the embedded ones), else None."""
    return embedded_gguf(model_name) if model_name in EMBEDDED else None


def copy_metadata(writer, reader) -> None:
    from gguf import GGUFValueType
    for key, field in reader.fields.items():
        if key.startswith(NOT_COPIED) or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def write_hyperparameters(writer, cfg) -> None:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
    theta = rope_parameters(cfg).get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != cfg.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def write_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (``tokenizer.json``, GPT-2 style as in SmolLM2 and LLaMA 3)."""
    import tempfile

    import gguf
    from gguf.vocab import BpeVocab, SpecialVocab
    if tokenizer is None:
        raise WorkbenchError("the run has no tokenizer to write into the GGUF file")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        spec = json.loads((Path(tmp) / "tokenizer.json").read_text()) if (Path(tmp) / "tokenizer.json").is_file() else {}
        model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
        if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
            raise WorkbenchError("the GGUF export builds byte-level BPE tokenizers (tokenizer.json, GPT-2 style) or "
                                 "copies the source GGUF's; this tokenizer is neither: save as pack-quantized instead")
        vocab = BpeVocab(Path(tmp))
        tokens, types = [], []
        for text, _score, kind in vocab.all_tokens():
            tokens.append(text)
            types.append(kind)
        if len(tokens) > vocab_size:
            raise WorkbenchError(f"the tokenizer has {len(tokens)} tokens, more than the model's {vocab_size}")
        for i in range(len(tokens), vocab_size):      # rows of the embedding no token uses
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("gpt2")
        # llama.cpp picks its pre-tokenizer by name; "default" is its generic byte-level split
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        SpecialVocab(Path(tmp), load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


# -- tensors ---------------------------------------------------------------------------------------

def source_tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors} if reader is not None else {}


def same_as_source(tensor: torch.Tensor, source) -> bool:
    """Whether the in-memory tensor holds exactly the source file's values (then its bytes are kept)."""
    from gguf.quants import dequantize
    if source is None or tuple(int(n) for n in reversed(source.shape)) != tuple(tensor.shape):
        return False
    values = dequantize(source.data, source.tensor_type).reshape(tensor.shape)
    return np.array_equal(values.astype(np.float32), tensor.detach().float().numpy())


FLOAT_TYPES = {"norm": np.float32, "embedding": np.float16, "linear": np.float32}   # what is not packed


def gguf_tensors(model, packed: dict, reader, float_types: dict | None = None,
                 progress=None) -> list[tuple[str, np.ndarray, object, bool]]:
    """``(name, data, raw type or None, quantized here)`` for every tensor of the file, in the model's order.

    A tensor that is not packed keeps the source file's bytes when it still holds their values
    (``reader``), else it is written in ``float_types``: norms, embedding and head, other linears.
    """
    import gguf
    float_types = {**FLOAT_TYPES, **(float_types or {})}
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    sources = source_tensors(reader)
    out = []
    state = unique_state(model)
    for hf_name, tensor in counted(state.items(), len(state), progress):
        if "rotary_emb" in hf_name:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise WorkbenchError(f"{hf_name} has no place in llama.cpp's LLaMA layout; save as pack-quantized instead")
        rows = None
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            rows = rotary_rows(tensor.shape[0], heads if name.endswith("attn_q.weight") else kv_heads)
        module = hf_name.rsplit(".", 1)[0]
        if module in packed:
            q = packed[module] if rows is None else permuted(packed[module], rows)
            out.append((name, pack(q), getattr(gguf.GGMLQuantizationType, q.grid.lattice.upper()), True))
            continue
        value = tensor.detach().float().cpu()
        value = value if rows is None else value[rows]
        source = sources.get(name)
        if same_as_source(value, source):
            out.append((name, np.asarray(source.data), source.tensor_type, False))
            continue
        kind = "norm" if value.dim() == 1 else "embedding" if name.startswith(("token_embd", "output.")) else "linear"
        out.append((name, value.numpy().astype(float_types[kind]), None, False))
    return out


def write_gguf(file: Path, model, tokenizer, packed: dict, model_name: str, file_type: str,
               keep_source: bool = True, float_types: dict | None = None, progress=None) -> list:
    """Write the file (no staging: see :func:`save_gguf`); returns what :func:`gguf_tensors` gave.
    ``progress(done, total)`` is told the tensors converted."""
    import gguf
    check_gguf_model(model)
    src = source_gguf(model_name)
    reader = gguf.GGUFReader(src) if src is not None else None
    tensors = gguf_tensors(model, packed, reader if keep_source else None, float_types, progress)
    writer = gguf.GGUFWriter(file, arch="llama")
    if reader is not None:
        copy_metadata(writer, reader)
    else:
        write_hyperparameters(writer, model.config)
        write_tokenizer(writer, tokenizer, model.config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, data, raw, _ in tensors:
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


# -- writing and reading -----------------------------------------------------------------------------

def save_gguf(result, path: str | os.PathLike, overwrite: bool = False, progress=None) -> ExportInfo:
    """Write ``result`` (from :func:`workbench.quantize` with ``format="gguf:TYPE"``) into ``path``:
    one ``.gguf`` file for llama.cpp and ``export.json`` with the sizes. Returns the sizes."""
    path = check_save_dir(path, overwrite, packed=False)
    check_gguf_model(result.model)
    lattice = lattice_of(result.packed)
    model_name = result.report.model if getattr(result, "report", None) is not None else "model"
    file_name = gguf_name(model_name, lattice)
    with staging_dir(path, overwrite, packed=False) as tmp:
        tensors = write_gguf(tmp / file_name, result.model, result.tokenizer, result.packed, model_name,
                             FILE_TYPES[lattice], progress=progress)
        info = measure_gguf(tmp / file_name, tensors, result, lattice)
        (tmp / EXPORT_INFO).write_text(json.dumps(info.to_dict(), indent=2))
    return info


def measure_gguf(file: Path, tensors, result, lattice: str) -> ExportInfo:
    from .quant.lattice import lattice as lattice_spec
    quantized = sum(data.nbytes for _, data, _, ours in tensors if ours)
    total = sum(data.nbytes for _, data, _, _ in tensors)
    layers = sorted(result.packed)
    float16 = sum(result.packed[n].codes.numel() * 2 for n in layers)
    lat = lattice_spec(lattice)
    return ExportInfo(format=f"{FORMAT_GGUF}:{lattice}", dtype="float16", bits=lat.bits, group_size=lat.sub_block,
                      symmetric=lat.symmetric, quantized_layers=len(layers), quantized_bytes=quantized,
                      float16_bytes=float16, other_bytes=total - quantized, total_bytes=file.stat().st_size,
                      ratio=float16 / quantized if quantized else 0.0, layers=layers)


def find_gguf(path: Path) -> Path:
    """The ``.gguf`` file itself, or the one file in a directory written by :func:`save_gguf`."""
    if path.is_file():
        return path
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(found) != 1:
        raise WorkbenchError(f"{str(path)!r} holds {len(found)} .gguf files; point at the file itself")
    return found[0]


def is_gguf(path: str | os.PathLike) -> bool:
    path = Path(path).expanduser()
    return (path.is_file() and path.suffix == ".gguf") or (path.is_dir() and not (path / "config.json").exists()
                                                          and any(path.glob("*.gguf")))


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> QuantizedCheckpoint:
    """A GGUF file (or the directory :func:`save_gguf` wrote) as a dense transformers model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models.loading import quiet_transformers
    file = find_gguf(Path(path).expanduser())
    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype).eval()
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    info_file = file.parent / EXPORT_INFO
    info = ExportInfo.from_json(info_file) if info_file.is_file() else None
    return QuantizedCheckpoint(model, tokenizer, {}, None, info, str(file))
