"""The service's routers, included by :func:`mlinvert.service.app.create_app` in this order."""
