"""``pixelwise serve``: a web page and an HTTP API in front of one :class:`~pixelwise.inference.Predictor`.

- :mod:`pixelwise.serve.config`: :class:`ServeConfig`, the limits and switches (no web imports).
- :mod:`pixelwise.serve.pool`: the bounded worker pool that answers 503 when it is full.
- :mod:`pixelwise.serve.uploads`: multipart bodies read in memory, images and masks decoded with limits.
- :mod:`pixelwise.serve.results`: predictions turned into the JSON the API returns (the same PNGs
  ``pixelwise predict`` writes).
- :mod:`pixelwise.serve.samples`: the sample images offered on the page.
- :mod:`pixelwise.serve.app`: the FastAPI application and :func:`~pixelwise.serve.app.run` (needs the
  ``serve`` extra: fastapi, uvicorn, python-multipart).

The page (``static/``) is served from the package: nothing is loaded from another host.
"""
