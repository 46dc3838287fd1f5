"""One ``APIRouter`` per resource; each route validates, calls the domain and shapes the response."""
