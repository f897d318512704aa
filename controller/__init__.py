"""`veil controller`: turns Gateways of class veil-waypoint into waypoint Deployments on
Kubernetes (waypoints.py decides, app.py applies)."""
