"""How the OpenAPI document describes staff-token authentication."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class StaffTokenScheme(OpenApiAuthenticationExtension):
    target_class = "tenants.auth.StaffTokenAuthentication"
    name = "staffToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "A staff token (tgs-...) issued in the admin or with "
            "`manage.py staff_token_issue USERNAME`.",
        }
