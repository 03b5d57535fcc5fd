"""The teaching trainer: the four systems of minildm, trained from scratch on the shapes world.

Read loop.py first: the training loop and the losses it lowers, top to bottom, like nanoGPT's
train.py. Then:

- recipes.py: the embedded models' sizes, noise schedules and settings (nanoGPT's config/);
- run.py: a whole run (`python -m minildm train ...`): the stages in order, resuming, reusing an
  earlier system's models, caching the latents, then saving and evaluating the folder;
- evaluate.py: the scores, the sample grids, the folder's README and training.json.

The folder is written in diffusers' layout by minildm/checkpoints/save.py.
"""
