"""The ``/admin/`` API: docker's verbs for a cache, as JSON, behind the token guard.

Each verb lives in its own module with an ``add_routes(admin)`` function; this
is the one place that mounts them. Handlers read the application's state with
``request.config_dict[KEY]`` because they run in the admin sub-application.
"""

from __future__ import annotations

from aiohttp import web

from proxy import admin_archive, admin_images, admin_lifecycle, admin_pull, admin_rmi, admin_search
from proxy.admin_auth import ADMIN_PREFIX, admin_app, check_admin_exposure
from proxy.keys import SETTINGS


def add_admin_routes(app: web.Application, token: str) -> web.Application:
    """Mount the guarded admin application on ``app``; returns it for tests."""
    check_admin_exposure(app[SETTINGS], token)
    admin = admin_app(token)
    admin_images.add_routes(admin)
    admin_rmi.add_routes(admin)
    admin_search.add_routes(admin)
    admin_pull.add_routes(admin)
    admin_lifecycle.add_routes(admin)
    admin_archive.add_routes(admin)
    app.add_subapp(ADMIN_PREFIX.rstrip("/"), admin)
    return admin
