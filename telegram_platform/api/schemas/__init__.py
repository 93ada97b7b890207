"""Request and response shapes; they validate input and generate the OpenAPI document.

A module per resource, beside the routes of the same name in `api/routes/`; `fields` holds the
annotated field types they share.
"""
