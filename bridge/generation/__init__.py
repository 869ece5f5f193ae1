"""Image generation: a popped payload -> the diffusers call that honours it, and a report of what it
could not.

samplers.py    horde sampler names -> diffusers schedulers (nearest + note where there is no exact match)
request.py     payload + model record + source + limits -> GenerationRequest + substitutions (pure)
masks.py       source image / mask conventions (source_mask, alpha channel), sizes
runner.py      the pipeline calls: txt2img, img2img, inpaint, depth2img, hires fix, tiling, censor,
               post-processing
censor.py      when and how images are censored
substitutions  Substitution -> gen_metadata entries
"""
