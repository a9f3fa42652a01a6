"""brainscan_web: a local web page over the brainscan SDK (`brainscan web`).

A small FastAPI app and one hand-written HTML/JS/CSS page, all served by the app
itself (no CDN). Uploads are held in memory for one request and never written
to disk or logs. Kept apart from `brainscan` so the SDK needs no web framework.

Research use only. Not a medical device; not for diagnosis or treatment decisions.
"""

from brainscan_web.app import create_app

__all__ = ["create_app"]
