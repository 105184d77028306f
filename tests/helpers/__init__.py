"""What the tests share, one module per subject; no test module imports from another test module.

tolerance       the repository's tolerance rule (assert_within_torch_error, assert_close, assert_within_rounding,
                assert_grads_within_torch_error, assert_triton_matches_torch, FLOOR, SEED)
runtime         HAS_CUDA, DEV, ROOT, count_calls, replay_captured_step, free_port, autocast, AUTOCAST
philox          an independent Philox4x32-10 and blipfast's draws and dropout rule written with it
attention       the check functions of the Triton attention kernels
itc             the check functions of the fused ITC loss
layernorm       the check functions of bias_dropout_add_layernorm, EXT (blipfast._C or None)
hard_negatives  the check functions of the hard-negative samplers (C++ op, chi-square, draw rules)
integration     the stage-1 ITM index path and a QFormer on the Triton kernels against float64
qformer         the QFormer parity check, random biases for HF models, per-case seeds, the tiny mode-test QFormer
blip_pretrain   a tiny BlipPretrain configuration and batch
train           ``blipfast train`` flags and run readers, the tiny BLIP (v1) model and ViT folder
stage2          tiny LLM folders, a LAVIS stage-1 checkpoint and the flags of ``blipfast train --stage 2``

The pytest fixtures (per-test seeds, ``one_thread``) are tests/conftest.py's.
"""
