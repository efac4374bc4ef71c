"""The operator page's static files (index.html, app.js, app.css), served at `/`."""
