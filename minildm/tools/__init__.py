"""What the command line runs, one file per command group; minildm/__main__.py only parses the
arguments and calls these.

    generate.py   sd, ldm, ldm-uncond, vq-diffusion (and sd --invert): check, load, run, write PNGs
    trace.py      trace (record a run's intermediates) and compare (find where two runs part)
    bench.py      bench: minildm's speed against diffusers', and the GPU check
    info.py       tokenize, and the overview printed with no command
"""
