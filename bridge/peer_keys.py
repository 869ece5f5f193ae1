"""Keys of the other workers' bridgeData.yaml that this worker accepts, and what each means here.

Sources: the legacy AI-Horde-Worker template, the horde-worker-reGen stable template, and reGen's 2026 line
(its configuration model, which adds the VRAM budget, multi-GPU, alchemy and download keys), plus the keys
of the horde SDK model those files are read with. A file written for any of them loads unchanged: a key
that maps onto one of ours is honoured (see `MAPPED_KEYS` and bridge/config.py), every other one is
accepted and listed by `--check-config` with the reason it has no effect here, never as a misspelling.
"""

from __future__ import annotations

# reGen keys whose value is turned into one of ours when the file is read.
MAPPED_KEYS: dict[str, str] = {
    "vram_reserve_mb": "vram_to_leave_free (megabytes of VRAM kept free)",
    "ram_reserve_mb": "ram_to_leave_free (megabytes of RAM kept free)",
    "alchemy_caption_enabled": "forms: false removes caption from the forms served",
    "model_stickiness": "horde_model_stickiness (no effect here either)",
}

_SCRIBE = "text generation (scribe) is not part of this worker"
_REGEN_PROCESSES = "reGen's process pool; this worker runs jobs on threads of one process"
_REGEN_BUDGET = "reGen's VRAM budget scheduler; memory here follows ram_to_leave_free / vram_to_leave_free"
_REGEN_TIMEOUTS = "reGen's per-step watchdog; jobs here are bounded by the horde's ttl"
_REGEN_FILES = "reGen's log and stats files; this worker writes one log (--log-file)"
_DRY_RUN = "reGen's dry-run switches; use run_worker.py --demo for an offline run"
_LARGE = "the large models it throttles (Flux, Cascade) are not served here"
_DOWNLOADS = "downloads here run two models at a time, one connection per file, resumable"

PEER_KEYS_WITHOUT_EFFECT: dict[str, str] = {
    # legacy AI-Horde-Worker template
    "disable_disk_cache": "there is no disk cache of unpacked models: models are read from their files",
    "scribe_name": _SCRIBE,
    "kai_url": _SCRIBE,
    "max_length": _SCRIBE,
    "max_context_length": _SCRIBE,
    "branded_model": _SCRIBE,
    "openai_api": _SCRIBE,
    "backend_engine": _SCRIBE,
    # reGen stable template
    "unload_models_from_vram_often": "the model cache moves models off the GPU as its budget requires",
    "very_fast_disk_mode": "models load from disk one at a time",
    "horde_model_stickiness": "pops always offer every ready model",
    # reGen 2026 line
    "gpu_overrides": "one GPU per worker here (gpu_device_indices picks it)",
    "gpu_pop_balance_threshold": "one GPU per worker here",
    "dedicated_post_processing": "post-processing runs in the job's own thread",
    "cycle_process_on_model_change": _REGEN_PROCESSES,
    "min_lora_disk_free_gb": "LoRA downloads are not part of this worker yet",
    "post_process_timeout": _REGEN_TIMEOUTS,
    "download_timeout": "a stalled download is retried with backoff, then given up",
    "download_max_parallel_downloads": _DOWNLOADS,
    "download_per_host_concurrency": _DOWNLOADS,
    "download_connections_per_file": _DOWNLOADS,
    "downloads_paused": "missing files are fetched at start; use only_models_on_disk to fetch nothing",
    "extra_model_directories": "models are read from cache_home (custom_model_reference lists own files)",
    "extra_stable_diffusion_models_folders": "models are read from cache_home only",
    "inference_step_timeout": _REGEN_TIMEOUTS,
    "inference_first_step_timeout": _REGEN_TIMEOUTS,
    "inference_stuck_step_repeat_limit": _REGEN_TIMEOUTS,
    "contended_step_timeout": _REGEN_TIMEOUTS,
    "overbudget_step_timeout": _REGEN_TIMEOUTS,
    "max_inference_attempts": "a failed job is submitted faulted at once (the horde reissues it)",
    "minutes_allowed_without_jobs": "no idle advisory",
    "gpu_sampling_lease_enabled": _REGEN_PROCESSES,
    "gpu_sampling_lease_slots": _REGEN_PROCESSES,
    "gpu_sampling_lease_tail_overlap": _REGEN_PROCESSES,
    "log_purge_max_age_days": _REGEN_FILES,
    "log_purge_max_total_gb": _REGEN_FILES,
    "stats_export_enabled": _REGEN_FILES,
    "stats_purge_max_age_days": _REGEN_FILES,
    "stats_purge_max_total_gb": _REGEN_FILES,
    "stats_autozip_enabled": _REGEN_FILES,
    "aesthetic_scoring_enabled": "no aesthetic score is attached to generations",
    "alchemy_allow_concurrent": "alchemy and generation share max_threads",
    "alchemy_max_concurrency": "alchemy and generation share max_threads",
    "alchemy_vram_headroom_mb": _REGEN_BUDGET,
    "alchemy_ram_headroom_mb": _REGEN_BUDGET,
    "enable_vram_budget": _REGEN_BUDGET,
    "enable_pipeline_disaggregation": _REGEN_PROCESSES,
    "pp_overlap_margin_mb_disaggregated": _REGEN_PROCESSES,
    "enable_image_utilities": "strip_background and the annotators run in this process",
    "extended_controlnet": "ControlNet is not part of this worker yet",
    "ram_pressure_pause_percent": _REGEN_BUDGET,
    "ram_pressure_min_free_mb": _REGEN_BUDGET,
    "ram_per_process_max_mb": _REGEN_PROCESSES,
    "post_processing_fault_breaker_enabled": "a failing post-processor faults its job only",
    "post_processing_fault_threshold": "a failing post-processor faults its job only",
    "post_processing_fault_window_seconds": "a failing post-processor faults its job only",
    "vram_per_process_overhead_mb": _REGEN_BUDGET,
    "overbudget_exclusive_mode": _REGEN_BUDGET,
    "whole_card_exclusive_residency": _REGEN_BUDGET,
    "whole_card_residency_safety_off_gpu": _REGEN_BUDGET,
    "whole_card_residency_cooldown_seconds": _REGEN_BUDGET,
    "large_model_switch_min_seconds": _LARGE,
    "large_model_reentry_cooldown_seconds": _LARGE,
    "unservable_model_fault_threshold": "a model that cannot be loaded is no longer advertised at once",
    "unservable_model_cooldown_seconds": "a model that cannot be loaded is no longer advertised at once",
    "aux_model_download_line_skip_threshold_seconds": "reGen documents it as without effect too",
    "idle_fill_threshold_seconds": "pops always offer every ready model",
    "self_maintenance_fault_threshold": "faults never pause popping here",
    "self_maintenance_window_seconds": "faults never pause popping here",
    "self_maintenance_cooldown_seconds": "faults never pause popping here",
    "comfy_smart_memory": "no ComfyUI here: the model cache keeps models resident within its budget",
    "dry_run_skip_inference": _DRY_RUN,
    "dry_run_skip_safety": _DRY_RUN,
    "dry_run_skip_post_processing": _DRY_RUN,
    "dry_run_skip_api": _DRY_RUN,
    "dry_run_inference_delay": _DRY_RUN,
}
