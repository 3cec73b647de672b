"""A4: serve similar-image search over HTTP: a web page, a JSON API and the reference images.

Loads, once, the features of proc/<datasetName>/ (3_featurizeImages.py), the network that made them (the refined
model.pt, or the pretrained rf_backbone) and the rankers of 4_trainSvm.py (without them only the fixed ones), then
serves until interrupted:

  GET  /                 page: drop or pick an image, see the top-k matches
  POST /query            multipart image, k, ranker, attributes -> JSON matches and timings
  GET  /images/<id>      a reference image (?thumb=1: a small JPEG)
  GET  /health           what is loaded
  GET  /map              the map of A7_embeddingMap.py, shown by the page's map view
  GET  /label-issues     the suspects of A6_findLabelIssues.py, shown by the page

The default ranker is hybrid when step 4 made a classifier (runs.PREFERRED_RANKER), else cosine
(runs.FALLBACK_RANKER). Knobs: svc_* in PARAMETERS.py (limits on uploads, slow clients and connections).
"""
import helpers


def add_arguments(parser):
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                                                            "only; 0.0.0.0 = every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")


def main(args, P):
    import uvicorn
    from image_similarity.apps.service import create_app, server_config
    helpers.require(P.featuresPath, "3_featurizeImages.py")
    if not 0 < args.port < 65536:
        raise helpers.UsageError(f"--port must be in 1..65535, got {args.port}")
    print(f"Loading {P.featuresPath} and its network ...")
    service = helpers.load_service(P)
    for note in service.notes:
        print(f"note: {note}")
    print(f"Serving {len(service.keys)} references of {P.datasetName} ({service.model_id} on "
          f"{service.embedder.runs_on}); rankers "
          f"{', '.join(service.rankers)} (default {service.default_ranker}); attributes "
          f"{', '.join(service.attributes) or 'none'}; uploads up to {service.max_upload_bytes:,} bytes")
    print(f"Open http://{args.host}:{args.port}/ (Ctrl+C stops)")
    timeout = P.svc_requestTimeoutSec or None
    app = create_app(service, timeout, P.svc_maxDecodes or None)
    try:
        uvicorn.Server(server_config(app, args.host, args.port, timeout, P.svc_maxConnections or None)).run()
    except KeyboardInterrupt:  # Ctrl+C (uvicorn re-raises it once the server has shut down): a normal end
        pass
    print(f"Done: served {P.datasetName} on {args.host}:{args.port}.")


if __name__ == "__main__":
    helpers.run(main, __doc__, add_arguments)
