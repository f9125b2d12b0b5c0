"""Second pass over a manifest: resolve each model's family, shape and source, with located errors."""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codefleet import demo_models
from codefleet.catalog import CATALOG, CatalogEntry, lookup
from codefleet.errors import Location, ManifestError
from codefleet.families import FAMILIES, Family, get_family
from codefleet.fim import FORMATS as FIM_FORMATS
from codefleet.gpus import GPUS, unknown_gpu_message
from codefleet.lora import LoraPlan, resolve_adapters
from codefleet.manifest import DECIDED_FLAGS, TENANT_NAME, LoadedManifest, ModelSpec
from codefleet.quant import Quant, detect
from codefleet.shapes import ModelShape
from codefleet.speculative import Speculative
from codefleet.speculative import problems as speculative_problems


@dataclass(frozen=True)
class ResolvedModel:
    """A manifest entry with everything the planner needs filled in."""

    index: int
    spec: ModelSpec
    family: Family
    shape: ModelShape
    catalog: CatalogEntry | None
    #: What vLLM's --model gets: a Hugging Face id or an absolute local directory.
    model_ref: str
    #: demo family when the source is demo://FAMILY (built before start).
    demo: str | None
    chat_template: Path
    gpu: str
    gpu_memory_utilization: float
    min_concurrent_sequences: int
    cpu_kv_cache_gib: int
    dtype: str
    max_model_len: int
    drain_seconds: int
    ttft_slo_seconds: float = 2.0
    #: Quantized weights (engine_args.quantization or the checkpoint's config.json).
    quant: Quant | None = None
    #: What the plan cannot account for, said before launch.
    warnings: tuple[str, ...] = ()
    #: Tuned fused-MoE configs (VLLM_TUNED_CONFIG_FOLDER), absolute.
    moe_config_dir: Path | None = None
    #: Fill-in-the-middle format (codefleet.fim), None: no ``suffix``.
    fim: str | None = None
    #: The model's ``speculative:`` or the defaults' (None: off).
    speculative: Speculative | None = None
    #: LoRA adapters and the engine's LoRA slots (codefleet.lora), None: LoRA off.
    lora: LoraPlan | None = None


def catalog_seed(catalog: CatalogEntry | None, demo: str | None, family: str | None) -> CatalogEntry | None:
    """The catalog entry whose defaults a model takes: its own, or a demo checkpoint's family's seed."""
    if catalog is not None or demo is None:
        return catalog
    return next((e for e in CATALOG.values() if e.family == family and not e.trained_demo), None)


def _dtype(spec: ModelSpec, catalog: CatalogEntry | None, config: dict[str, Any] | None) -> str:
    if spec.dtype != "auto":
        return spec.dtype
    if catalog is not None:
        return catalog.dtype
    return str((config or {}).get("torch_dtype") or "bfloat16")


def resolve(loaded: LoadedManifest) -> list[ResolvedModel]:
    """Resolve every model; collect all problems before raising one ManifestError."""
    problems: list[tuple[Location, str]] = []
    out: list[ResolvedModel] = []
    manifest = loaded.manifest
    seen: dict[str, int] = {}
    for i, spec in enumerate(manifest.models):
        at = ("models", i)
        if spec.name in seen:
            problems.append(
                (loaded.location((*at, "name")), f"served name {spec.name!r} is already used by models[{seen[spec.name]}]")
            )
        seen.setdefault(spec.name, i)
        try:
            out.append(_resolve_one(loaded, i, spec))
        except ManifestError as exc:
            problems.extend(exc.problems)
    adapters: dict[str, int] = {}
    for i, spec in enumerate(manifest.models):
        for j, a in enumerate(spec.adapters):
            where = loaded.location(("models", i, "adapters", j, "name"))
            if a.name in seen:
                problems.append((where, f"adapter name {a.name!r} is the served name of models[{seen[a.name]}]; "
                                 f"clients choose an adapter by its name, so it must differ from every model's"))
            elif a.name in adapters:
                problems.append((where, f"adapter name {a.name!r} is already used in models[{adapters[a.name]}]"))
            adapters.setdefault(a.name, i)
    servable = [*seen, *adapters]
    for name, tenant in manifest.tenants.items():
        if not re.fullmatch(TENANT_NAME, name):
            problems.append((loaded.location(("tenants", name)),
                             f"tenant name {name!r}: letters, digits, '.', '_', '-', at most 63 characters"))
        for j, model in enumerate(tenant.models or []):
            if model not in seen and model not in adapters:
                near = difflib.get_close_matches(model, servable, n=1)
                problems.append((loaded.location(("tenants", name, "models", j)),
                                 f"unknown model {model!r}" + (f"; did you mean {near[0]!r}?" if near else
                                                               f"; served models: {', '.join(servable)}")))
    if manifest.tenants and manifest.router.api_keys is None:
        problems.append((loaded.location(("tenants",)), "tenants need router.api_keys: a tenant is known by its key"))
    if problems:
        raise ManifestError(problems)
    return out


def _resolve_one(loaded: LoadedManifest, i: int, spec: ModelSpec) -> ResolvedModel:
    at: tuple[str | int, ...] = ("models", i)
    problems: list[tuple[Location, str]] = []
    defaults = loaded.manifest.defaults

    def fail(field: str, message: str) -> None:
        problems.append((loaded.location((*at, field)), message))

    catalog = lookup(spec.source)
    demo = demo_models.demo_family(spec.source)
    config: dict[str, Any] | None = None
    model_ref = spec.source
    if demo is not None:
        if demo not in demo_models.NAMES:
            fail("source", f"unknown demo model {spec.source!r}; known: "
                 + ", ".join(demo_models.SCHEME + f for f in demo_models.NAMES))
            raise ManifestError(problems)
        if demo_models.is_trained(demo):
            catalog = lookup(demo_models.TRAINED[demo])
        config = demo_models.hf_config(demo)
        model_ref = str(demo_models.model_dir(demo))
    elif catalog is None:
        local = Path(spec.source).expanduser()
        if not local.is_absolute():
            local = (loaded.file.parent / local).resolve()
        if (local / "config.json").is_file():
            config = json.loads((local / "config.json").read_text())
            model_ref = str(local)
        elif local.exists() or spec.source.startswith((".", "/", "~")):
            fail("source", f"{local} has no config.json; a local source must be a Hugging Face model directory")
            raise ManifestError(problems)
        else:
            near = difflib.get_close_matches(spec.source, list(CATALOG), n=1, cutoff=0.7)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            fail("source", f"{spec.source!r} is not in the catalog and not a local directory, so its shape is "
                 f"unknown; download it and point source at the directory, or use one of: "
                 f"{', '.join(CATALOG)}.{hint}")
            raise ManifestError(problems)

    family_name = spec.family or (catalog.family if catalog else demo)
    if family_name is None:
        fail("family", f"family is required for a model outside the catalog; known: {', '.join(FAMILIES)}")
    elif family_name not in FAMILIES:
        near = difflib.get_close_matches(family_name, list(FAMILIES), n=1, cutoff=0.6)
        hint = f"did you mean {near[0]!r}? " if near else ""
        fail("family", f"unknown family {family_name!r}; {hint}known: {', '.join(FAMILIES)}")

    shape: ModelShape | None = catalog.shape if catalog else None
    if shape is None and config is not None:
        try:
            shape = ModelShape.from_hf_config(config)
        except (ValueError, KeyError) as exc:
            fail("source", f"cannot read the model's shape from config.json: {exc}")

    gpu = spec.gpu or defaults.gpu
    gpu_field = "gpu" if spec.gpu else None
    if gpu != "cpu" and gpu not in GPUS:
        where = (*at, "gpu") if gpu_field else ("defaults", "gpu")
        problems.append((loaded.location(where), unknown_gpu_message(gpu)))

    engine_quant = spec.engine_args.get("quantization", spec.engine_args.get("--quantization"))
    quant, quant_warning = detect(str(engine_quant) if engine_quant else None, config)
    if shape is not None:
        tp = spec.tensor_parallel_size
        if tp is not None:
            group = quant.group_size if quant else None
            why = shape.tp_problems(tp, group)
            if why:
                valid = shape.valid_tensor_parallel_sizes(group)
                fail("tensor_parallel_size",
                     f"vLLM cannot split {spec.source} over {tp} GPUs: {'; '.join(why)}; valid values: "
                     f"{', '.join(map(str, valid))}")
        if spec.max_model_len is not None and spec.max_model_len > shape.max_position:
            fail("max_model_len",
                 f"{spec.max_model_len} is longer than the model's {shape.max_position} positions; "
                 f"use at most {shape.max_position}")

    for key in spec.engine_args:
        # vLLM's parser also takes an abbreviation (--speculative for --speculative-config) and a
        # dotted key into a config (--speculative-config.method)
        flag = key.lstrip("-").replace("-", "_").split(".")[0]
        decided = flag if flag in DECIDED_FLAGS else next((d for d in DECIDED_FLAGS if flag and d.startswith(flag)), None)
        if decided is not None:
            problems.append((loaded.location((*at, "engine_args", key)),
                             f"{key!r} is decided by codefleet" + (f" (vLLM reads it as {decided!r})" if decided != flag
                                                                   else "")
                             + f"; set the model's {DECIDED_FLAGS[decided]!r} field instead"))

    template: Path | None = None
    if spec.chat_template is not None:
        template = Path(spec.chat_template).expanduser()
        if not template.is_absolute():
            template = (loaded.file.parent / template).resolve()
        if not template.is_file():
            fail("chat_template", f"chat template file {template} does not exist")
    moe_dir: Path | None = None
    if (moe_setting := spec.moe_config_dir or defaults.moe_config_dir) is not None:
        moe_dir = Path(moe_setting).expanduser()
        if not moe_dir.is_absolute():
            moe_dir = (loaded.file.parent / moe_dir).resolve()
        if not moe_dir.is_dir():
            where = (*at, "moe_config_dir") if spec.moe_config_dir else ("defaults", "moe_config_dir")
            problems.append((loaded.location(where), f"moe_config_dir {moe_dir} is not a folder"))
    seed = catalog_seed(catalog, demo, family_name)
    fim: str | None = spec.fim if isinstance(spec.fim, str) else None
    if spec.fim is None and seed is not None:
        fim = seed.fim
    elif spec.fim is True:
        fim = seed.fim if seed is not None else None
        if fim is None:
            known = ", ".join(FIM_FORMATS)
            reason = (f"the catalog says {seed.hf_id} does not fill in the middle ({seed.fim_source})" if seed is not None
                      else f"{spec.source} is not in the catalog, so its format is unknown")
            fail("fim", f"fim: true, but {reason}; name the format the model was trained with ({known}) or set fim: false")
    lora = None
    if shape is not None:
        lora, lora_problems = resolve_adapters(
            spec.adapters, spec.max_loras, spec.max_lora_rank, manifest_dir=loaded.file.parent,
            base_names={spec.source, model_ref, *([catalog.hf_id] if catalog else [])},
            architecture=shape.architecture, on_cpu=gpu == "cpu", demo_dir=Path(model_ref) if demo else None,
            demo_root=demo_models.cache_root().parent / "demo-adapters")
        problems.extend((loaded.location((*at, *path)), message) for path, message in lora_problems)
    speculative = spec.speculative if spec.speculative is not None else defaults.speculative
    if speculative is not None and speculative.on:
        where = (*at, "speculative") if spec.speculative is not None else ("defaults", "speculative")
        card = seed.card_sampling if seed is not None else {}
        for message in speculative_problems(speculative, on_cpu=gpu == "cpu", sampling=card,
                                            model_dir=Path(model_ref) if config is not None else None,
                                            engine_args={**spec.engine_args, "enable_lora": lora is not None}):
            problems.append((loaded.location(where), message))
    else:
        speculative = None
    if problems:
        raise ManifestError(problems)
    assert shape is not None and family_name is not None
    family = get_family(family_name)
    return ResolvedModel(
        index=i,
        spec=spec,
        family=family,
        shape=shape,
        catalog=catalog,
        model_ref=model_ref,
        demo=demo,
        chat_template=template or family.template_path(),
        gpu=gpu,
        gpu_memory_utilization=spec.gpu_memory_utilization or defaults.gpu_memory_utilization,
        min_concurrent_sequences=spec.min_concurrent_sequences or defaults.min_concurrent_sequences,
        cpu_kv_cache_gib=spec.cpu_kv_cache_gib or defaults.cpu_kv_cache_gib,
        dtype=_dtype(spec, catalog, config),
        max_model_len=spec.max_model_len or shape.max_position,
        drain_seconds=spec.drain_seconds or defaults.drain_seconds,
        ttft_slo_seconds=spec.ttft_slo_seconds or defaults.ttft_slo_seconds,
        quant=quant,
        warnings=(quant_warning,) if quant_warning else (),
        moe_config_dir=moe_dir if shape.is_moe else None,
        fim=fim,
        speculative=speculative,
        lora=lora,
    )

