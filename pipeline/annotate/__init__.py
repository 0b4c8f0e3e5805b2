"""The assisted-manual stage: a browser annotation tool with SAM's decoder in the browser.

    queue.py       the images, their keys and units (plan_queue), and the leases
    store.py       working masks saved atomically; finished units committed as shards
    embeddings.py  image embeddings (cached, computed ahead) and the ONNX decoder export
    session.py     the operations of the web API over one output
    server.py      the FastAPI app (token, size limits, static files) and its runner
    simulated.py   a scripted annotator that drives the same HTTP API against ground truth
    static/        the front end (onnxruntime-web, pinned, in static/vendor/)
"""
