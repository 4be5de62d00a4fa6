"""The ``/admin/`` API: docker's verbs for a cache, as JSON, behind the token guard.

Each verb lives in its own module with an ``add_routes(admin)`` function; this
is the one place that mounts them. Handlers read the application's state with
``request.config_dict[KEY]`` because they run in the admin sub-application.
"""

from __future__ import annotations

from aiohttp import web

from proxy.admin import archive, images, lifecycle, pull, rmi, search
from proxy.admin.guard import ADMIN_PREFIX, AdminKey, admin_app, check_admin_exposure
from proxy.resources import SETTINGS


def add_admin_routes(app: web.Application, keys: list[AdminKey]) -> web.Application:
    """Mount the guarded admin application on ``app``; returns it for tests."""
    check_admin_exposure(app[SETTINGS], keys)
    admin = admin_app(keys)
    images.add_routes(admin)
    rmi.add_routes(admin)
    search.add_routes(admin)
    pull.add_routes(admin)
    lifecycle.add_routes(admin)
    archive.add_routes(admin)
    app.add_subapp(ADMIN_PREFIX.rstrip("/"), admin)
    return admin
