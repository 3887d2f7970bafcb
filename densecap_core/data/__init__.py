"""The data side of DenseCap: a synthetic scene generator, Visual Genome preprocessing, the HDF5 dataset.

Modules (import the one you need; importing this package imports nothing heavy):

- ``scene``: the structured truth of a synthetic scene (shapes, colours, sizes, textures, placement with an
  occlusion bound, groups, spatial relations). Numpy only.
- ``draw``: draws a scene into an RGB array (backgrounds, textured anti-aliased shapes, lighting, noise).
- ``grammar``: phrases for object, group and relation regions, and the parser that checks a caption against
  a region's truth (``caption_matches``), for caption-exactness evaluation.
- ``synth``: writes a synthetic dataset in Visual Genome format, and Y4M clips of moving scenes.
- ``y4m``: a YUV4MPEG2 (planar I420) writer and reader.
- ``h5layout``: the HDF5 file layout and its box convention, in one place.
- ``preprocess``: Visual Genome format (regions + images) to one HDF5 file and a vocabulary JSON.
- ``h5dataset``: the torch ``Dataset`` that reads that HDF5 file (imports torch).

Formats and decisions: ``docs/data.md``.
"""
