// Starts Swagger UI on Conveyor's /docs page (api_service/swagger_ui). A file, not an inline script, so
// the page's Content-Security-Policy can allow scripts from this origin only.
"use strict";

window.ui = SwaggerUIBundle({
  url: document.getElementById("swagger-ui").dataset.specUrl,
  dom_id: "#swagger-ui",
});
