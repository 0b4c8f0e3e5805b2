"""The assisted-manual stage: a browser annotation tool with SAM's decoder in the browser.

    queue.py       the images, their keys and units (plan_queue), and the leases
    store.py       working masks saved atomically; finished units committed as shards
    embeddings.py  image embeddings (cached, computed ahead) and the ONNX decoder export
    rle.py         masks between the page (uncompressed RLE counts) and the dataset
    session.py     the operations of the web API over one output
    server.py      the FastAPI app (token, size limits, static files) and its runner
    app.py         builds all of it from the stage's config (the stage and benchmarks)
    simulated.py   a scripted annotator that drives the same HTTP API against ground truth
    static/        the front end: app.js (the tool), decoder.js (onnxruntime-web), masks.js;
                   onnxruntime-web pinned in static/vendor/
"""
