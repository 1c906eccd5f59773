// Starts Swagger UI on /docs (medlens.service.security): the bundle is served by this server, and this file
// replaces the inline script FastAPI's page would need, so the Content-Security-Policy can forbid inline code.
// validatorUrl: null keeps Swagger UI from loading a badge from validator.swagger.io.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
